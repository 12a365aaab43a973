// The single-page app: who is signed in, which page the address names, and the header.
// Pages are addressed by the URL fragment (#/images/<id>), so the service serves one file.
import { ApiClient } from "./api.js";
import { h, show } from "./dom.js";
import { renderImage } from "./views/image.js";
import { renderImages } from "./views/images.js";
import { renderKeys } from "./views/keys.js";
import { renderModels } from "./views/models.js";
import { renderSignIn } from "./views/signin.js";
import { renderUpload } from "./views/upload.js";
import { may } from "./roles.js";

// sessionStorage, not localStorage: the key leaves with the tab and is never shared across tabs.
const KEY_STORAGE = "mammofl.apiKey";

const ROUTES = [
  { pattern: /^#\/images\/(.+)$/, title: "Image", render: (container, context, [imageId]) =>
    renderImage(container, { ...context, imageId: decodeURIComponent(imageId) }) },
  { pattern: /^#\/images$/, title: "Images", render: renderImages },
  { pattern: /^#\/upload$/, title: "Upload", render: renderUpload },
  { pattern: /^#\/models$/, title: "Models", render: renderModels },
  { pattern: /^#\/keys$/, title: "API keys", render: renderKeys },
];

class App {
  constructor() {
    this.view = document.getElementById("view");
    this.identity = null;
    this.api = null;
    this.cleanup = null;
    this.flashMessage = null;
    this.rendering = 0;
    document.getElementById("sign-out").addEventListener("click", () => {
      // The next key may belong to another site or role: it starts from the image list, not from
      // this key's last page. (A key the service stopped accepting keeps the page, to sign in again.)
      history.replaceState(null, "", location.pathname + location.search);
      this.signOut();
    });
    window.addEventListener("hashchange", () => this.route());
  }

  async start() {
    const apiKey = sessionStorage.getItem(KEY_STORAGE);
    if (!apiKey) {
      this.showSignIn();
      return;
    }
    const api = this.client(apiKey);
    try {
      this.signIn(apiKey, await api.whoami());
    } catch (error) {
      sessionStorage.removeItem(KEY_STORAGE);
      this.showSignIn(`Please sign in again: ${error.message}`);
    }
  }

  client(apiKey) {
    return new ApiClient(apiKey, {
      onUnauthorized: (error) => this.signOut(`Signed out: the service no longer accepts this API key (${error.detail}).`),
    });
  }

  signIn(apiKey, identity) {
    sessionStorage.setItem(KEY_STORAGE, apiKey);
    this.api = this.client(apiKey);
    this.identity = identity;
    document.getElementById("identity-site").textContent = identity.site_id;
    document.getElementById("identity-role").textContent = identity.role;
    document.getElementById("identity-key").textContent = identity.key_id;
    document.getElementById("identity").hidden = false;
    document.getElementById("nav").hidden = false;
    document.getElementById("nav-upload").hidden = !may(identity, "uploader");
    document.getElementById("nav-keys").hidden = !may(identity, "admin");
    this.route();
  }

  signOut(notice) {
    if (!this.identity && !notice) return;
    sessionStorage.removeItem(KEY_STORAGE);
    this.api = null;
    this.identity = null;
    document.getElementById("identity").hidden = true;
    document.getElementById("nav").hidden = true;
    this.showSignIn(notice);
  }

  showSignIn(notice) {
    this.runCleanup();
    document.title = "Sign in · mammofl";
    renderSignIn(this.view, { notice, onSignedIn: (apiKey, identity) => this.signIn(apiKey, identity) });
  }

  async route() {
    if (!this.identity) return;
    const route = ROUTES.find((candidate) => candidate.pattern.test(location.hash));
    if (!route) {
      location.replace("#/images"); // fires hashchange, which routes again
      return;
    }
    const parameters = location.hash.match(route.pattern).slice(1);
    this.runCleanup();
    this.markCurrentLink();
    document.title = `${route.title} · mammofl`;
    const page = h("div", { class: "page" });
    const flash = this.flashMessage;
    this.flashMessage = null;
    show(this.view, flash ? h("p", { role: "status", class: "flash" }, flash) : null, page);
    const rendering = ++this.rendering;
    const context = {
      api: this.api,
      identity: this.identity,
      navigate: (hash) => { location.hash = hash; },
      flash: (message) => { this.flashMessage = message; },
    };
    // Focus moves to the new page, as a full page load would move it, for keyboard and screen readers.
    this.view.focus({ preventScroll: true });
    const cleanup = await route.render(page, context, parameters);
    // A page left before it finished loading cleans up at once.
    if (rendering === this.rendering) this.cleanup = cleanup ?? null;
    else cleanup?.();
  }

  markCurrentLink() {
    for (const link of document.querySelectorAll("#nav a")) {
      const current = location.hash === link.getAttribute("href")
        || location.hash.startsWith(`${link.getAttribute("href")}/`);
      if (current) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
  }

  runCleanup() {
    this.cleanup?.();
    this.cleanup = null;
  }
}

new App().start();
