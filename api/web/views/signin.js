// Sign-in: the API key is checked against /v1/whoami before it is kept (sessionStorage only).
import { ApiClient } from "../api.js";
import { Feedback } from "../feedback.js";
import { h, show } from "../dom.js";

export function renderSignIn(container, { onSignedIn, notice }) {
  const feedback = new Feedback();
  const keyInput = h("input", {
    id: "api-key", name: "api-key", type: "password", required: true,
    autocomplete: "off", spellcheck: "false",
  });
  const submit = h("button", { type: "submit" }, "Sign in");
  const form = h("form", { class: "card narrow", "aria-labelledby": "signin-title" },
    h("h1", { id: "signin-title" }, "Sign in"),
    h("p", {}, "Enter the API key your site administrator gave you. ",
      "It is kept in this browser tab only and forgotten when the tab closes."),
    h("label", { for: "api-key" }, "API key"),
    keyInput,
    h("div", { class: "actions" }, submit),
    feedback.element);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const apiKey = keyInput.value.trim();
    const identity = await feedback.run([submit, keyInput], "Checking the API key…", "Sign-in failed",
      () => new ApiClient(apiKey).whoami());
    if (identity) onSignedIn(apiKey, identity);
  });
  show(container, form);
  if (notice) feedback.error(notice);
  keyInput.focus();
}
