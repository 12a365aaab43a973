// The REST client: one place that adds the API key, turns {"detail": ...} answers into
// ApiError with a message a person can act on, and reports an invalid key to the app.

/** An answer from the service that is not a success, or no answer at all (status 0). */
export class ApiError extends Error {
  constructor(status, detail) {
    super(status === 0 ? detail : `${detail} (HTTP ${status})`);
    this.name = "ApiError";
    this.status = status;
    this.detail = detail;
  }
}

/** FastAPI's `detail` is a string for our errors and a list of field problems for 422. */
function describeDetail(detail) {
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail.map((problem) => {
      const field = (problem.loc ?? []).filter((part) => part !== "body").join(".");
      return field ? `${field}: ${problem.msg}` : problem.msg;
    }).join("; ");
  }
  return JSON.stringify(detail);
}

async function errorFrom(response) {
  let detail = `${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    if (body && body.detail !== undefined) detail = describeDetail(body.detail);
  } catch {
    // Not JSON (a proxy's HTML page, an empty body): the status line is all there is to say.
  }
  return new ApiError(response.status, detail);
}

export class ApiClient {
  /**
   * @param {string} apiKey the bearer token
   * @param {{onUnauthorized?: (error: ApiError) => void}} options called on every 401, so
   *   the app can sign out when a key is revoked while it is in use
   */
  constructor(apiKey, { onUnauthorized } = {}) {
    this.apiKey = apiKey;
    this.onUnauthorized = onUnauthorized;
    this.base = new URL("v1/", document.baseURI);
  }

  url(path, query = {}) {
    const url = new URL(path, this.base);
    for (const [name, value] of Object.entries(query)) {
      if (value !== null && value !== undefined && value !== "") url.searchParams.set(name, value);
    }
    return url;
  }

  /** Sends a request; resolves to the parsed JSON body, or null for 204. */
  async request(method, path, { query, json, form } = {}) {
    const response = await this.send(method, path, { query, json, form });
    if (response.status === 204) return null;
    return response.json();
  }

  /** Fetches binary content (an image rendering) as a Blob. */
  async blob(path, query) {
    const response = await this.send("GET", path, { query });
    return response.blob();
  }

  async send(method, path, { query, json, form } = {}) {
    const headers = { Authorization: `Bearer ${this.apiKey}`, Accept: "application/json" };
    let body;
    if (json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(json);
    } else if (form !== undefined) {
      body = form; // the browser writes the multipart boundary itself
    }
    let response;
    try {
      response = await fetch(this.url(path, query), { method, headers, body });
    } catch (cause) {
      throw new ApiError(0, `Cannot reach the mammofl service (${cause.message})`);
    }
    if (response.ok) return response;
    const error = await errorFrom(response);
    if (error.status === 401 && this.onUnauthorized) this.onUnauthorized(error);
    throw error;
  }

  whoami() { return this.request("GET", "whoami"); }
  listImages(pageToken) {
    return this.request("GET", "images", { query: { page_size: 20, page_token: pageToken } });
  }
  getImage(imageId) { return this.request("GET", `images/${encodeURIComponent(imageId)}`); }
  imageContent(imageId, format) {
    return this.blob(`images/${encodeURIComponent(imageId)}/content`, { format });
  }
  deleteImage(imageId) { return this.request("DELETE", `images/${encodeURIComponent(imageId)}`); }
  uploadImage(file) { return this.request("POST", "images", { form: fileForm(file) }); }
  predict(imageId, variant) {
    return this.request("POST", `images/${encodeURIComponent(imageId)}/predictions`,
      { json: { variant: variant || null } });
  }
  listPredictions(imageId) {
    return this.request("GET", `images/${encodeURIComponent(imageId)}/predictions`);
  }
  uploadAndPredict(file, variant) {
    const form = fileForm(file);
    if (variant) form.append("variant", variant);
    return this.request("POST", "predict", { form });
  }
  listModels() { return this.request("GET", "models"); }
  createKey(key) { return this.request("POST", "keys", { json: key }); }
  listKeys() { return this.request("GET", "keys"); }
  revokeKey(keyId) { return this.request("DELETE", `keys/${encodeURIComponent(keyId)}`); }
}

function fileForm(file) {
  const form = new FormData();
  form.append("file", file, file.name);
  return form;
}
