// The selret search page: choose or drop a query image (or click a result), optionally draw a
// box on it, and POST /search. Plain browser JavaScript, no build step and no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);

// The current query: an uploaded file, or an indexed image's id, never both.
const query = {
  file: null,
  id: null,
  name: "",
  width: 0,   // size of the upright original image: the pixel frame of the box
  height: 0,
  box: null,  // [x1, y1, x2, y2] in original-image pixels, or null for the whole image
};
let previewUrl = null;
let searching = false;

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function setStatus(message) {
  $("status").textContent = message;
}

// ------------------------------------------------------------------ API key

// Only when the server asks for one (401): the key is asked once and kept for this tab.
const KEY_STORE = "selret-api-key";

async function api(url, options = {}) {
  for (let attempt = 0; ; attempt++) {
    const headers = new Headers(options.headers || {});
    const key = sessionStorage.getItem(KEY_STORE);
    if (key) headers.set("X-API-Key", key);
    const response = await fetch(url, { ...options, headers });
    if (response.status !== 401 || attempt > 0) return response;
    const entered = window.prompt("This server needs an API key:");
    if (!entered || !entered.trim()) return response;
    sessionStorage.setItem(KEY_STORE, entered.trim());
  }
}

// An <img> cannot send a header: with a key, thumbnails are fetched and shown from a blob.
async function showThumbnail(img, url) {
  if (!sessionStorage.getItem(KEY_STORE)) {
    img.src = url;
    return;
  }
  const response = await api(url);
  if (!response.ok) return;
  const blobUrl = URL.createObjectURL(await response.blob());
  img.addEventListener("load", () => URL.revokeObjectURL(blobUrl), { once: true });
  img.src = blobUrl;
}

// The reason an API error response gives (`detail`), else the HTTP status line.
async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.detail) {
      return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    }
  } catch (_) {
    // Not JSON: fall through to the status.
  }
  return `${response.status} ${response.statusText}`;
}

function setPreview(blob, name) {
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = URL.createObjectURL(blob);
  const img = $("preview-image");
  return new Promise((resolve, reject) => {
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error(`${name}: the browser cannot display this image`));
    img.src = previewUrl;
    $("query-name").textContent = name;
    $("preview").hidden = false;
    clearBox();
  });
}

async function chooseFile(file) {
  if (!file) return;
  showError("");
  Object.assign(query, { file, id: null, name: file.name, box: null });
  $("search-button").disabled = false;
  try {
    const img = await setPreview(file, file.name);
    // Browsers display photos upright (EXIF), as the server decodes them.
    query.width = img.naturalWidth;
    query.height = img.naturalHeight;
  } catch (err) {
    // Still searchable: the server gives the real reason if the file is not an image.
    query.width = query.height = 0;
    showError(err.message);
  }
}

// Query with an indexed image (a clicked result): its preview comes from the server, with the
// original size in headers so that a box drawn on the preview maps to original pixels.
async function chooseIndexed(result) {
  showError("");
  const response = await api(`/images/${result.id}?size=768`);
  if (!response.ok) {
    showError(await errorText(response));
    return false;
  }
  Object.assign(query, {
    file: null,
    id: result.id,
    name: result.name,
    box: null,
    width: Number(response.headers.get("X-Image-Width")) || 0,
    height: Number(response.headers.get("X-Image-Height")) || 0,
  });
  $("search-button").disabled = false;
  await setPreview(await response.blob(), `${result.name} (indexed image #${result.id})`);
  return true;
}

// ------------------------------------------------------------------ box drawing

function clearBox() {
  query.box = null;
  $("box-overlay").hidden = true;
  $("bbox-text").textContent = "whole image";
  $("clear-box").disabled = true;
}

function showBox(x1, y1, x2, y2) {
  // Displayed pixels of the preview.
  const overlay = $("box-overlay");
  Object.assign(overlay.style, {
    left: `${x1}px`, top: `${y1}px`, width: `${x2 - x1}px`, height: `${y2 - y1}px`,
  });
  overlay.hidden = false;
}

function setupBoxDrawing() {
  const frame = $("preview-frame");
  const img = $("preview-image");
  let start = null;

  const point = (event) => {
    const rect = img.getBoundingClientRect();
    return [
      Math.min(Math.max(event.clientX - rect.left, 0), rect.width),
      Math.min(Math.max(event.clientY - rect.top, 0), rect.height),
    ];
  };
  const corners = (a, b) => [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]), Math.max(a[1], b[1])];

  frame.addEventListener("pointerdown", (event) => {
    if (event.button !== 0 || !query.width) return;
    event.preventDefault();
    frame.setPointerCapture(event.pointerId);
    start = point(event);
  });
  frame.addEventListener("pointermove", (event) => {
    if (start) showBox(...corners(start, point(event)));
  });
  const finish = (event) => {
    if (!start) return;
    const [x1, y1, x2, y2] = corners(start, point(event));
    start = null;
    if (x2 - x1 < 4 || y2 - y1 < 4) {  // a click, not a drag
      clearBox();
      return;
    }
    // Displayed pixels -> original-image pixels.
    const sx = query.width / img.clientWidth;
    const sy = query.height / img.clientHeight;
    query.box = [
      Math.round(x1 * sx), Math.round(y1 * sy),
      Math.min(query.width, Math.round(x2 * sx)), Math.min(query.height, Math.round(y2 * sy)),
    ];
    $("bbox-text").textContent = query.box.join(", ");
    $("clear-box").disabled = false;
  };
  frame.addEventListener("pointerup", finish);
  frame.addEventListener("pointercancel", () => { start = null; clearBox(); });
  // The box is kept in original pixels; redraw it when the preview is resized.
  window.addEventListener("resize", () => {
    if (!query.box) return;
    const sx = img.clientWidth / query.width;
    const sy = img.clientHeight / query.height;
    const [x1, y1, x2, y2] = query.box;
    showBox(x1 * sx, y1 * sy, x2 * sx, y2 * sy);
  });
}

// ------------------------------------------------------------------ search

async function search() {
  if (searching || (!query.file && query.id === null)) return;
  searching = true;
  $("search-button").disabled = true;
  showError("");
  setStatus("Searching…");
  const form = new FormData();
  if (query.file) form.append("image", query.file, query.file.name);
  else form.append("id", String(query.id));
  form.append("top_k", $("top-k").value);
  const expansion = Number($("query-expansion").value) || 0;
  if (expansion > 0) form.append("query_expansion", String(expansion));
  if (query.box) form.append("bbox", query.box.join(","));
  try {
    const response = await api("/search", { method: "POST", body: form });
    if (!response.ok) {
      showError(await errorText(response));
      setStatus("");
      return;
    }
    const data = await response.json();
    renderResults(data.results);
    const region = query.box ? ` in box ${query.box.join(", ")}` : "";
    setStatus(`${data.results.length} results for ${query.name}${region} · ${data.took_ms.toFixed(0)} ms · ${data.dim}-D vectors`);
  } catch (err) {
    showError(`The server did not answer: ${err.message}`);
    setStatus("");
  } finally {
    searching = false;
    $("search-button").disabled = false;
  }
}

function renderResults(results) {
  const list = $("results");
  list.replaceChildren();
  $("results-empty").hidden = results.length > 0;
  if (!results.length) $("results-empty").textContent = "No results: the index is empty.";
  for (const result of results) {
    const item = document.createElement("li");
    item.className = "result";
    item.dataset.id = result.id;

    const button = document.createElement("button");
    button.type = "button";
    button.title = `Search with ${result.name}`;
    const img = document.createElement("img");
    img.alt = result.name;
    img.loading = "lazy";
    showThumbnail(img, result.thumbnail_url);
    const rank = document.createElement("span");
    rank.className = "rank";
    rank.textContent = `#${result.rank}`;
    button.append(img, rank);
    button.addEventListener("click", async () => {
      if (await chooseIndexed(result)) search();
    });

    const caption = document.createElement("div");
    caption.className = "caption";
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = result.name;
    name.title = result.name;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = result.score.toFixed(3);
    score.title = "cosine similarity";
    caption.append(name, score);

    item.append(button, caption);
    list.append(item);
  }
}

// ------------------------------------------------------------------ setup

async function loadInfo() {
  try {
    const response = await api("/stats");
    if (!response.ok) throw new Error(await errorText(response));
    const s = await response.json();
    $("index-info").textContent = `${s.count} images indexed · ${s.dim}-D ${s.kind} index · ${s.encoder}`;
  } catch (err) {
    $("index-info").textContent = `index information unavailable (${err.message})`;
  }
}

function setupDropZone() {
  const zone = $("drop-zone");
  $("file-input").addEventListener("change", (event) => chooseFile(event.target.files[0]));
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); $("file-input").click(); }
  });
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (event) => { event.preventDefault(); zone.classList.add("dragging"); });
  }
  for (const type of ["dragleave", "drop"]) {
    zone.addEventListener(type, () => zone.classList.remove("dragging"));
  }
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    chooseFile(event.dataTransfer.files[0]);
  });
}

setupDropZone();
setupBoxDrawing();
$("clear-box").addEventListener("click", clearBox);
$("search-button").addEventListener("click", search);
loadInfo();
