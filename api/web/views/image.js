// One image: its de-identified rendering, what de-identification did, predictions on it, and
// deletion. The rendering is fetched with the API key and shown through an object URL,
// because an <img src> request cannot carry the Authorization header.
import { Feedback, confirmAction } from "../feedback.js";
import { h, show } from "../dom.js";
import { deidentificationSummary, imageFacts } from "../image_info.js";
import { predictionHistory, predictionResult, variantSelect } from "../prediction.js";
import { may, roleNotice } from "../roles.js";

export async function renderImage(container, { api, identity, imageId, navigate, flash }) {
  const feedback = new Feedback();
  show(container, h("h1", {}, "Image"), feedback.element);
  const image = await feedback.run([], "Loading the image…", "Could not load the image",
    () => api.getImage(imageId));
  if (!image) {
    container.append(h("p", {}, h("a", { href: "#/images" }, "Back to the image list")));
    return undefined;
  }

  const objectUrls = [];
  const preview = h("figure", { class: "preview" }, h("p", { class: "muted" }, "Loading the rendering…"));
  const predictions = new PredictionPanel(api, identity, imageId);
  const deleteButton = h("button", { type: "button", class: "danger" }, "Delete image");
  const download = h("button", { type: "button", class: "secondary" }, "Download original");
  deleteButton.addEventListener("click", async () => {
    const confirmed = await confirmAction({
      title: "Delete this image?",
      message: `Image ${image.image_id} and its predictions will be removed from the store. This cannot be undone.`,
      confirmLabel: "Delete",
    });
    if (!confirmed) return;
    const deleted = await feedback.run([deleteButton, download], "Deleting the image…", "Could not delete the image",
      async () => { await api.deleteImage(image.image_id); return true; });
    if (deleted) {
      flash(`Image ${image.image_id} was deleted.`);
      navigate("#/images");
    }
  });
  download.addEventListener("click", () => feedback.run([download], "Downloading the original…",
    "Could not download the original", async () => {
      const url = URL.createObjectURL(await api.imageContent(image.image_id, "original"));
      objectUrls.push(url);
      const extension = image.content_type === "application/dicom" ? "dcm" : image.content_type.split("/").pop();
      h("a", { href: url, download: `${image.image_id}.${extension}` }).click();
    }));

  show(container,
    h("h1", {}, `Image ${image.image_id}`),
    h("p", {}, h("a", { href: "#/images" }, "Back to the image list")),
    feedback.element,
    h("div", { class: "columns" },
      h("div", {}, preview, h("div", { class: "actions" }, download, may(identity, "admin") ? deleteButton : null)),
      h("div", {},
        h("section", { class: "card", "aria-labelledby": "facts-title" },
          h("h2", { id: "facts-title" }, "Details"), imageFacts(image)),
        deidentificationSummary(image))),
    predictions.element);

  loadPreview(api, image, preview, objectUrls);
  predictions.load();
  return () => objectUrls.forEach((url) => URL.revokeObjectURL(url));
}

async function loadPreview(api, image, preview, objectUrls) {
  try {
    const url = URL.createObjectURL(await api.imageContent(image.image_id, "png"));
    objectUrls.push(url);
    show(preview,
      h("img", { src: url, alt: `De-identified rendering of image ${image.image_id}` }),
      h("figcaption", {}, "De-identified content (PNG rendering)"));
  } catch (error) {
    show(preview, h("p", { role: "alert", class: "error" }, `Could not render the image: ${error.message}`));
  }
}

/** Running a prediction with a chosen variant, and the image's earlier predictions. */
class PredictionPanel {
  constructor(api, identity, imageId) {
    this.api = api;
    this.identity = identity;
    this.imageId = imageId;
    this.feedback = new Feedback();
    this.form = h("form", { class: "inline" });
    this.result = h("div");
    this.history = h("div");
    this.element = h("section", { class: "card", "aria-labelledby": "predict-title" },
      h("h2", { id: "predict-title" }, "Predictions"),
      this.form, this.feedback.element, this.result,
      this.history);
  }

  async load() {
    const [models, history] = await Promise.allSettled([this.api.listModels(), this.api.listPredictions(this.imageId)]);
    if (!may(this.identity, "uploader")) show(this.form, roleNotice(this.identity, "uploader", "Running a prediction"));
    else if (models.status === "fulfilled") this.showForm(models.value);
    else this.feedback.error(`Could not list the model variants: ${models.reason.message}`);
    if (history.status === "fulfilled") show(this.history, predictionHistory(history.value.predictions));
    else show(this.history, h("p", { role: "alert", class: "error" }, `Could not list past predictions: ${history.reason.message}`));
  }

  showForm(models) {
    const select = variantSelect("predict-variant", models);
    const submit = h("button", { type: "submit" }, "Run prediction");
    show(this.form, h("label", { for: "predict-variant" }, "Model variant"), select, submit);
    this.form.addEventListener("submit", async (event) => {
      event.preventDefault();
      show(this.result);
      const prediction = await this.feedback.run([submit, select], "Running the model…", "Prediction failed",
        () => this.api.predict(this.imageId, select.value));
      if (!prediction) return;
      show(this.result, predictionResult(prediction));
      const history = await this.api.listPredictions(this.imageId).catch((error) => {
        this.feedback.error(`Could not refresh past predictions: ${error.message}`);
      });
      if (history) show(this.history, predictionHistory(history.predictions));
    });
  }
}
