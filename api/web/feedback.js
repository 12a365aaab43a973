// What a person sees while a request runs and when it fails: the controls that started it are
// disabled, a status line says what is happening, and the service's own message is shown.
import { h } from "./dom.js";

export class Feedback {
  constructor() {
    this.status = h("p", { role: "status", class: "status" });
    this.alert = h("div", { role: "alert", class: "error", hidden: true });
    this.element = h("div", { class: "feedback" }, this.status, this.alert);
  }

  /**
   * Runs `work` with `controls` disabled and `busyText` announced. Resolves to its result, or
   * to undefined after showing the error, prefixed with `failureText`.
   */
  async run(controls, busyText, failureText, work) {
    const disabledBefore = controls.map((control) => control.disabled);
    controls.forEach((control) => { control.disabled = true; });
    this.element.setAttribute("aria-busy", "true");
    this.clear();
    this.status.textContent = busyText;
    try {
      return await work();
    } catch (error) {
      this.error(`${failureText}: ${error.message}`);
      return undefined;
    } finally {
      controls.forEach((control, index) => { control.disabled = disabledBefore[index]; });
      this.element.removeAttribute("aria-busy");
      if (this.status.textContent === busyText) this.status.textContent = "";
    }
  }

  error(message) {
    this.alert.textContent = message;
    this.alert.hidden = false;
  }

  done(message) {
    this.status.textContent = message;
  }

  clear() {
    this.alert.textContent = "";
    this.alert.hidden = true;
    this.status.textContent = "";
  }
}

/**
 * Asks before something that cannot be undone. Resolves true when the person confirms.
 * A native <dialog> keeps focus inside it and closes on Escape.
 */
export function confirmAction({ title, message, confirmLabel }) {
  return new Promise((resolve) => {
    const cancel = h("button", { type: "button", class: "secondary", onclick: () => dialog.close("cancel") }, "Cancel");
    const confirm = h("button", { type: "button", class: "danger", onclick: () => dialog.close("confirm") }, confirmLabel);
    const dialog = h("dialog", { "aria-labelledby": "confirm-title", "aria-describedby": "confirm-message" },
      h("h2", { id: "confirm-title" }, title),
      h("p", { id: "confirm-message" }, message),
      h("div", { class: "actions" }, cancel, confirm));
    dialog.addEventListener("close", () => {
      dialog.remove();
      resolve(dialog.returnValue === "confirm");
    });
    document.body.append(dialog);
    dialog.showModal();
    cancel.focus();
  });
}
