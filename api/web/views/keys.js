// API key administration (admin role): a new key is shown once, here, and never again.
import { Feedback, confirmAction } from "../feedback.js";
import { h, show, timestamp } from "../dom.js";
import { may, roleNotice } from "../roles.js";

const ROLES = ["uploader", "reader", "admin"];

export async function renderKeys(container, { api, identity }) {
  if (!may(identity, "admin")) {
    show(container, h("h1", {}, "API keys"), roleNotice(identity, "admin", "Managing API keys"));
    return;
  }
  const feedback = new Feedback();
  const created = h("div");
  const listing = h("div");
  const reload = async () => {
    const keys = await feedback.run([], "Loading the API keys…", "Could not list the API keys", () => api.listKeys());
    if (keys) show(listing, keyTable(keys.keys, revoke));
  };
  const revoke = async (key, button) => {
    const confirmed = await confirmAction({
      title: "Revoke this API key?",
      message: `Key ${key.key_id} (${key.name}, ${key.role} at ${key.site_id}) will stop working at once.`,
      confirmLabel: "Revoke",
    });
    if (!confirmed) return;
    const revoked = await feedback.run([button], "Revoking the key…", "Could not revoke the key",
      async () => { await api.revokeKey(key.key_id); return true; });
    if (revoked) {
      await reload();
      feedback.done(`Key ${key.key_id} was revoked.`);
    }
  };

  show(container,
    h("h1", {}, "API keys"),
    createForm(api, identity, feedback, (key) => { show(created, newKeyNotice(key)); reload(); }),
    created,
    feedback.element,
    listing);
  await reload();
}

function createForm(api, identity, feedback, onCreated) {
  // The service lets an admin issue keys for its own site only (others: `mammofl api-keys create`).
  const site = h("input", { id: "key-site", name: "site_id", readonly: true, value: identity.site_id });
  const role = h("select", { id: "key-role", name: "role" },
    ROLES.map((name) => h("option", { value: name }, name)));
  const name = h("input", { id: "key-name", name: "name", required: true, placeholder: "e.g. reading room 2" });
  const submit = h("button", { type: "submit" }, "Create key");
  const form = h("form", { class: "card", "aria-labelledby": "create-key-title" },
    h("h2", { id: "create-key-title" }, "Create a key"),
    h("div", { class: "grid" },
      h("label", { for: "key-site" }, "Site ID"), site,
      h("label", { for: "key-role" }, "Role"), role,
      h("label", { for: "key-name" }, "Key name"), name),
    h("div", { class: "actions" }, submit));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = await feedback.run([site, role, name, submit], "Creating the key…", "Could not create the key",
      () => api.createKey({ site_id: site.value.trim(), role: role.value, name: name.value.trim() }));
    if (!key) return;
    name.value = "";
    onCreated(key);
  });
  return form;
}

function newKeyNotice(key) {
  const value = h("input", { id: "new-api-key", readonly: true, value: key.api_key, class: "secret" });
  const copy = h("button", { type: "button", class: "secondary" }, "Copy key");
  const copied = h("span", { role: "status" });
  copy.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(key.api_key);
      copied.textContent = "Copied.";
    } catch {
      value.select();
      copied.textContent = "Select the key and copy it by hand.";
    }
  });
  return h("section", { class: "card notice", "aria-labelledby": "new-key-title" },
    h("h2", { id: "new-key-title" }, `New key for ${key.name}`),
    h("p", {}, h("strong", {}, "This key is shown only now. "), "Copy it now and give it to its holder; it cannot be shown again."),
    h("label", { for: "new-api-key" }, "New API key"),
    h("div", { class: "inline" }, value, copy, copied),
    h("p", { class: "muted" }, `Key ID ${key.key_id} · ${key.role} at ${key.site_id}`));
}

function keyTable(keys, revoke) {
  if (keys.length === 0) return h("p", { class: "muted" }, "No API keys.");
  return h("table", { class: "keys" },
    h("caption", {}, "Existing keys"),
    h("thead", {}, h("tr", {}, ["Key ID", "Name", "Site", "Role", "Created", "Last used", "State", ""]
      .map((label) => h("th", { scope: "col" }, label)))),
    h("tbody", {}, keys.map((key) => {
      // Revoked keys stay listed (the audit log names them); only live ones can be revoked.
      let action = "";
      if (!key.revoked_at) {
        action = h("button", { type: "button", class: "danger small", "aria-label": `Revoke key ${key.name}` }, "Revoke");
        action.addEventListener("click", () => revoke(key, action));
      }
      const state = key.revoked_at ? h("span", {}, "revoked ", timestamp(key.revoked_at))
        : key.expires_at ? h("span", {}, "expires ", timestamp(key.expires_at)) : "active";
      return h("tr", { class: key.revoked_at ? "revoked" : "" },
        h("td", {}, h("code", {}, key.key_id)),
        h("td", {}, key.name),
        h("td", {}, key.site_id),
        h("td", {}, key.role),
        h("td", {}, timestamp(key.created_at)),
        h("td", {}, key.last_used_at ? timestamp(key.last_used_at) : "never"),
        h("td", {}, state),
        h("td", {}, action));
    })));
}
