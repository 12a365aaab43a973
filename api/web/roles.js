// The service's role ranking (api/auth.py): a reader reads its site's images and predictions,
// an uploader also uploads and predicts, an admin also deletes images and manages keys. The
// page hides what the key may not do; the service still decides, and its 403 is shown.
import { h } from "./dom.js";

const RANK = { reader: 0, uploader: 1, admin: 2 };

/** Whether `identity` (the body of /v1/whoami) has at least `role`. */
export function may(identity, role) {
  return (RANK[identity.role] ?? -1) >= RANK[role];
}

/** Says why an action is not offered, e.g. "Uploading needs the uploader role; ...". */
export function roleNotice(identity, role, action) {
  return h("p", { class: "muted" }, `${action} needs the ${role} role; this key has the ${identity.role} role.`);
}
