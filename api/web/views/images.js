// The site's images, 20 to a page, newest first as the service orders them.
import { Feedback } from "../feedback.js";
import { bytes, h, show, timestamp } from "../dom.js";
import { dimensions, imageLink } from "../image_info.js";
import { may } from "../roles.js";

export async function renderImages(container, { api, identity }) {
  const feedback = new Feedback();
  const listing = h("div", { class: "listing" });
  // page_token of every page shown so far, so "Previous page" can go back.
  const tokens = [null];
  const previous = h("button", { type: "button", class: "secondary", disabled: true }, "Previous page");
  const next = h("button", { type: "button", class: "secondary", disabled: true }, "Next page");
  const refresh = h("button", { type: "button", class: "secondary" }, "Refresh");
  let nextToken = null;

  async function load() {
    const page = await feedback.run([previous, next, refresh], "Loading images…", "Could not list images",
      () => api.listImages(tokens.at(-1)));
    if (!page) return;
    nextToken = page.next_page_token;
    show(listing, imageTable(page.images, identity.site_id, tokens.length));
    previous.disabled = tokens.length === 1;
    next.disabled = !nextToken;
  }
  previous.addEventListener("click", () => { tokens.pop(); load(); });
  next.addEventListener("click", () => { tokens.push(nextToken); load(); });
  refresh.addEventListener("click", load);

  show(container,
    h("h1", {}, `Images of site ${identity.site_id}`),
    may(identity, "uploader") ? h("p", {}, h("a", { href: "#/upload", class: "button" }, "Upload an image")) : null,
    feedback.element,
    listing,
    h("nav", { class: "actions", "aria-label": "Image pages" }, previous, next, refresh));
  await load();
}

function imageTable(images, siteId, pageNumber) {
  if (images.length === 0) {
    return h("p", { class: "muted" }, pageNumber === 1 ? `No images stored for site ${siteId} yet.` : "No more images.");
  }
  return h("table", { class: "images" },
    h("caption", {}, `Stored images, page ${pageNumber}`),
    h("thead", {}, h("tr", {}, ["Image", "Content type", "Dimensions", "Size", "Uploaded"]
      .map((label) => h("th", { scope: "col" }, label)))),
    h("tbody", {}, images.map((image) => h("tr", {},
      h("td", {}, imageLink(image)),
      h("td", {}, image.content_type),
      h("td", {}, dimensions(image)),
      h("td", { class: "number" }, bytes(image.size)),
      h("td", {}, timestamp(image.created_at))))));
}
