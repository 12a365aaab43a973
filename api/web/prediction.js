// How a prediction reads: the predicted class first, the three probabilities, the derived
// presence and type read-outs, then which model answered and how fast.
import { h, percent, timestamp } from "./dom.js";

export const CLASS_NAMES = ["normal", "benign", "malignant"];

export function predictionResult(prediction) {
  return h("section", { class: "card prediction", "aria-labelledby": `prediction-${prediction.prediction_id}` },
    h("h3", { id: `prediction-${prediction.prediction_id}` }, "Prediction result"),
    h("p", { class: "predicted" }, "Predicted class: ",
      h("strong", { class: `class-${prediction.predicted_class}` }, prediction.predicted_class)),
    probabilityTable(prediction.probabilities, prediction.predicted_class),
    h("dl", { class: "facts" },
      h("dt", {}, "Lesion present"),
      h("dd", {}, percent(prediction.presence.probability)),
      h("dt", {}, "Malignant, given a lesion"),
      h("dd", {}, percent(prediction.type.malignant_given_lesion)),
      h("dt", {}, "Model variant"), h("dd", {}, prediction.variant),
      h("dt", {}, "Backend"), h("dd", {}, prediction.backend),
      h("dt", {}, "Model version"), h("dd", {}, prediction.model_version),
      h("dt", {}, "Latency"), h("dd", {}, `${prediction.latency_ms.toFixed(1)} ms`),
      h("dt", {}, "Predicted at"), h("dd", {}, timestamp(prediction.created_at))));
}

function probabilityTable(probabilities, predictedClass) {
  return h("table", { class: "probabilities" },
    h("caption", {}, "Class probabilities"),
    h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Class"), h("th", { scope: "col" }, "Probability"))),
    h("tbody", {}, CLASS_NAMES.map((name) => h("tr", { class: name === predictedClass ? "chosen" : null },
      h("th", { scope: "row" }, name),
      h("td", {},
        h("meter", { min: 0, max: 1, value: probabilities[name], "aria-label": `${name} probability` }),
        " ", percent(probabilities[name]))))));
}

export function predictionHistory(predictions) {
  if (predictions.length === 0) return h("p", { class: "muted" }, "No predictions yet for this image.");
  return h("table", { class: "history" },
    h("caption", {}, "Past predictions"),
    h("thead", {}, h("tr", {},
      ["Predicted at", "Variant", "Predicted class", ...CLASS_NAMES.map((name) => `P(${name})`), "Latency"]
        .map((label) => h("th", { scope: "col" }, label)))),
    h("tbody", {}, predictions.map((prediction) => h("tr", {},
      h("td", {}, timestamp(prediction.created_at)),
      h("td", {}, prediction.variant),
      h("td", {}, prediction.predicted_class),
      CLASS_NAMES.map((name) => h("td", { class: "number" }, percent(prediction.probabilities[name]))),
      h("td", { class: "number" }, `${prediction.latency_ms.toFixed(1)} ms`)))));
}

/**
 * A labelled select of the served variants, the service's default chosen. `models` is the
 * body of GET /v1/models.
 */
export function variantSelect(id, models) {
  return h("select", { id, name: "variant" }, models.models.map((model) => h("option", {
    value: model.variant,
    selected: model.variant === models.default,
  }, model.variant === models.default ? `${model.variant} (default)` : model.variant)));
}
