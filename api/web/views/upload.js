// Upload a DICOM, PNG or JPEG: stored only, or stored and predicted in one request.
import { Feedback } from "../feedback.js";
import { h, show } from "../dom.js";
import { deidentificationSummary, imageFacts, imageLink } from "../image_info.js";
import { predictionResult, variantSelect } from "../prediction.js";
import { may, roleNotice } from "../roles.js";

export async function renderUpload(container, { api, identity }) {
  if (!may(identity, "uploader")) {
    show(container, h("h1", {}, "Upload an image"), roleNotice(identity, "uploader", "Uploading"));
    return;
  }
  const feedback = new Feedback();
  const fileInput = h("input", {
    id: "upload-file", name: "file", type: "file", required: true,
    accept: ".dcm,.dicom,application/dicom,image/png,image/jpeg",
  });
  const variantSlot = h("div", { class: "field" });
  const upload = h("button", { type: "submit", value: "upload" }, "Upload");
  const uploadAndPredict = h("button", { type: "submit", value: "predict", disabled: true }, "Upload and predict");
  const result = h("div", { class: "result" });
  const form = h("form", { class: "card", "aria-labelledby": "upload-title" },
    h("h1", { id: "upload-title" }, "Upload an image"),
    h("p", {}, "The service de-identifies every upload before storing it: DICOM files by the PS3.15 profile, ",
      "PNG and JPEG files by re-encoding them without their metadata."),
    h("div", { class: "field" }, h("label", { for: "upload-file" }, "Image file"), fileInput),
    variantSlot,
    h("div", { class: "actions" }, upload, uploadAndPredict),
    feedback.element);
  const controls = () => [fileInput, upload, uploadAndPredict, ...variantSlot.querySelectorAll("select")];

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const file = fileInput.files[0];
    if (!file) {
      feedback.error("Choose a file to upload first.");
      return;
    }
    show(result); // an earlier upload's result must not stand beside this one's error
    const withPrediction = event.submitter === uploadAndPredict;
    const select = variantSlot.querySelector("select");
    const answer = withPrediction
      ? await feedback.run(controls(), `Uploading ${file.name} and running the model…`, "Upload and predict failed",
        () => api.uploadAndPredict(file, select.value))
      : await feedback.run(controls(), `Uploading ${file.name}…`, "Upload failed",
        async () => ({ image: await api.uploadImage(file) }));
    if (!answer) return;
    feedback.done(`Stored ${file.name} as image ${answer.image.image_id}.`);
    show(result, uploaded(answer.image, answer.prediction));
  });

  show(container, form, result);
  try {
    const models = await api.listModels();
    show(variantSlot, h("label", { for: "upload-variant" }, "Model variant"), variantSelect("upload-variant", models));
    uploadAndPredict.disabled = false;
  } catch (error) {
    feedback.error(`Could not list the model variants, so only uploading is possible: ${error.message}`);
  }
}

function uploaded(image, prediction) {
  return h("section", { "aria-labelledby": "uploaded-title" },
    h("h2", { id: "uploaded-title" }, "Uploaded image"),
    h("p", {}, "Open ", imageLink(image), " to view it and its predictions."),
    h("div", { class: "columns" },
      h("section", { class: "card", "aria-label": "Details" }, imageFacts(image)),
      deidentificationSummary(image)),
    prediction ? predictionResult(prediction) : null);
}
