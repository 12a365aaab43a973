// Element building without innerHTML: every value from the API is set as text, never parsed
// as markup, so a file name or a de-identification note cannot inject anything into the page.

/**
 * Creates an element. `props` keys starting with "on" become event listeners, `value`,
 * `checked`, `disabled` and `hidden` are set as properties, anything else as an attribute
 * (null, undefined and false leave it out). Children may be nodes, strings, numbers or arrays.
 */
export function h(tag, props = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(props ?? {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else if (["value", "checked", "disabled", "hidden"].includes(name)) element[name] = value;
    else element.setAttribute(name, value === true ? "" : String(value));
  }
  element.append(...nodes(children));
  return element;
}

function nodes(children) {
  return children.flat(Infinity)
    .filter((child) => child !== null && child !== undefined && child !== false)
    .map((child) => (child instanceof Node ? child : String(child)));
}

/** A percentage with one decimal, e.g. 0.4123 -> "41.2 %". */
export function percent(probability) {
  return `${(probability * 100).toFixed(1)} %`;
}

/** A byte count in the unit a person reads most easily. */
export function bytes(count) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let value = count;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${unit === 0 ? value : value.toFixed(1)} ${units[unit]}`;
}

/** A timestamp from the API in the reader's locale, keeping the ISO text as a tooltip. */
export function timestamp(iso) {
  const parsed = new Date(iso);
  const text = Number.isNaN(parsed.getTime()) ? iso : parsed.toLocaleString();
  return h("time", { datetime: iso, title: iso }, text);
}

/**
 * Renders any JSON value (the de-identification summary, a model's metrics) as nested
 * definition lists, so new fields from the service show up without a front-end change.
 */
export function jsonView(value) {
  if (Array.isArray(value)) {
    if (value.length === 0) return h("span", { class: "muted" }, "none");
    return h("ul", { class: "json-list" }, value.map((item) => h("li", {}, jsonView(item))));
  }
  if (value !== null && typeof value === "object") {
    const entries = Object.entries(value);
    if (entries.length === 0) return h("span", { class: "muted" }, "none");
    return h("dl", { class: "json" }, entries.map(([key, item]) => [
      h("dt", {}, humanise(key)),
      h("dd", {}, jsonView(item)),
    ]));
  }
  if (typeof value === "number" && !Number.isInteger(value)) return value.toFixed(4);
  if (value === null) return h("span", { class: "muted" }, "none");
  return String(value);
}

const ACRONYMS = { auc: "AUC", ppv: "PPV", npv: "NPV" };

/** "macro_auc" -> "Macro AUC", "burned_in_text" -> "Burned in text". */
export function humanise(key) {
  const words = String(key).split("_").map((word) => ACRONYMS[word.toLowerCase()] ?? word);
  const text = words.join(" ");
  return text.charAt(0).toUpperCase() + text.slice(1);
}

/** Replaces a container's content with the given children. */
export function show(container, ...children) {
  container.replaceChildren(...nodes(children));
}
