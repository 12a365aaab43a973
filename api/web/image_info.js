// What the service knows about a stored image, and what de-identification did to it.
import { bytes, h, jsonView, timestamp } from "./dom.js";

export function imageLink(image) {
  return h("a", { href: `#/images/${encodeURIComponent(image.image_id)}` }, image.image_id);
}

export function imageFacts(image) {
  return h("dl", { class: "facts" },
    h("dt", {}, "Image ID"), h("dd", {}, h("code", {}, image.image_id)),
    h("dt", {}, "Site"), h("dd", {}, image.site_id),
    h("dt", {}, "Content type"), h("dd", {}, image.content_type),
    h("dt", {}, "Dimensions"), h("dd", {}, dimensions(image)),
    h("dt", {}, "Stored size"), h("dd", {}, bytes(image.size)),
    h("dt", {}, "Uploaded"), h("dd", {}, timestamp(image.created_at)));
}

export function dimensions(image) {
  return image.width && image.height ? `${image.width} × ${image.height} px` : "unknown";
}

const METHODS = {
  "dicom-ps3.15": "DICOM PS3.15 basic profile",
  "raster-reencode": "Raster image re-encoded (metadata dropped)",
};

// The summary names attributes and counts what was done to them; it never carries a value.
const KNOWN_FIELDS = ["method", "options", "key_id", "action_counts", "removed", "changed", "redactions", "dates"];

export function deidentificationSummary(image) {
  const summary = image.deidentification;
  const titleId = `deid-${image.image_id}`;
  const title = h("h3", { id: titleId }, "De-identification summary");
  if (!summary) {
    return h("section", { class: "card", "aria-labelledby": titleId }, title,
      h("p", { class: "muted" }, "The service recorded no de-identification for this image."));
  }
  const extra = Object.fromEntries(Object.entries(summary).filter(([key]) => !KNOWN_FIELDS.includes(key)));
  return h("section", { class: "card", "aria-labelledby": titleId }, title,
    h("dl", { class: "facts" },
      h("dt", {}, "Method"), h("dd", {}, METHODS[summary.method] ?? summary.method),
      summary.options?.length ? [h("dt", {}, "Profile options"), h("dd", {}, summary.options.map((option) => option.replaceAll("_", " ")).join(", "))] : null,
      summary.key_id ? [h("dt", {}, "Pseudonym key"), h("dd", {}, h("code", {}, summary.key_id))] : null,
      summary.dates ? [h("dt", {}, "Dates"), h("dd", {}, summary.dates.toLowerCase())] : null,
      h("dt", {}, "Burned-in text boxes blanked"), h("dd", {}, String(summary.redactions ?? 0)),
      h("dt", {}, "Actions"), h("dd", {}, actionCounts(summary.action_counts))),
    attributeList("Attributes removed", summary.removed),
    attributeList("Attributes changed", summary.changed),
    Object.keys(extra).length ? jsonView(extra) : null);
}

function actionCounts(counts) {
  const entries = Object.entries(counts ?? {});
  if (entries.length === 0) return "none";
  return entries.map(([action, count]) => `${action.replaceAll("_", " ")} ${count}`).join(" · ");
}

function attributeList(label, attributes) {
  if (!attributes?.length) return null;
  return h("details", {},
    h("summary", {}, `${label} (${attributes.length})`),
    h("ul", { class: "attributes" }, attributes.map((name) => h("li", {}, h("code", {}, name)))));
}
