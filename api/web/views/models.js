// The served model variants and their metrics from the compression report.
import { Feedback } from "../feedback.js";
import { bytes, h, humanise, show } from "../dom.js";

export async function renderModels(container, { api }) {
  const feedback = new Feedback();
  const listing = h("div");
  show(container, h("h1", {}, "Models"), feedback.element, listing);
  const models = await feedback.run([], "Loading the model variants…", "Could not list the models",
    () => api.listModels());
  if (!models) return;
  if (models.models.length === 0) {
    show(listing, h("p", { class: "muted" }, "The service has no model variants to serve."));
    return;
  }
  show(listing,
    h("p", {}, "Predictions use ", h("strong", {}, models.default), " unless another variant is chosen."),
    modelTable(models));
}

function modelTable(models) {
  // Variants may report different metrics (latency only where measured): one column per name.
  const metricNames = [...new Set(models.models.flatMap((model) => Object.keys(model.metrics ?? {})))];
  return h("div", { class: "scroll" }, h("table", { class: "models" },
    h("caption", {}, "Served model variants"),
    h("thead", {}, h("tr", {},
      ["Variant", "Backend", "Model version", "Input size", "Size", ...metricNames.map(humanise)]
        .map((label) => h("th", { scope: "col" }, label)))),
    h("tbody", {}, models.models.map((model) => h("tr", { class: model.variant === models.default ? "chosen" : null },
      h("th", { scope: "row" }, model.variant, model.variant === models.default ? " (default)" : ""),
      h("td", {}, model.backend),
      h("td", {}, h("code", {}, model.model_version)),
      h("td", { class: "number" }, `${model.input_size} px`),
      h("td", { class: "number" }, bytes(model.size_bytes)),
      metricNames.map((name) => h("td", { class: "number" }, metric(model.metrics?.[name]))))))));
}

function metric(value) {
  if (value === undefined || value === null) return "–";
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toFixed(4);
  return typeof value === "object" ? JSON.stringify(value) : String(value);
}
