// stylebot web chat: every text users typed is shown with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const shown = new Map();          // message id -> element
let actions = {};                  // action -> emoji, from /info
let folded = false;                // the tiny banner folds to one line at the first result, once

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function showError(text) {
  const box = $("error");
  box.textContent = text;
  box.hidden = !text;
}

function render(m) {
  const div = el("div", "msg " + (m.by === "you" ? "you" : "bot") + (m.error ? " error" : ""));
  div.dataset.id = m.id;
  div.appendChild(el("span", "text", m.text));
  if (m.attachment) div.appendChild(el("span", "att", "photo: " + m.attachment));
  if (m.progress || m.preview) {
    const p = el("div", "progress");
    if (m.preview) { const img = el("img"); img.src = m.preview; img.alt = "your face so far"; p.appendChild(img); }
    p.appendChild(el("span", "", m.progress || ""));
    div.appendChild(p);
  }
  if (m.media) {
    const row = el("div", "figures");
    if (m.aligned) row.appendChild(figure(m.aligned, "the face I found", "aligned"));
    if (m.first_media) row.appendChild(figure(m.first_media, "first guess (encoder)", "first"));
    const caption = m.first ? "first guess: refining…" : m.stopped ? "first guess (encoder)" : m.first_media ? "refined" :
      m.aligned ? "your face in " + (m.model || "the model") : "";
    row.appendChild(figure(m.media, caption, "result"));
    div.appendChild(row);
  }
  const applies = m.actions || [];
  if (applies.length) {
    const row = el("div", "actions");
    for (const action of applies) {
      const b = el("button", "", ((actions[action] || "") + " " + action).trim());
      b.type = "button";
      b.dataset.action = action;
      b.addEventListener("click", () => react(m.id, action));
      row.appendChild(b);
    }
    div.appendChild(row);
  }
  if (m.model && m.media) div.appendChild(el("div", "meta", "made with the " + m.model + " model"));
  return div;
}

function figure(src, caption, cls) {
  const f = el("figure", cls);
  const img = el("img", cls);
  img.src = src;
  img.alt = caption || "result";
  f.appendChild(img);
  if (caption) f.appendChild(el("figcaption", "", caption));
  return f;
}

function show(m) {
  if (m.media && !folded) { $("tiny").open = false; folded = true; }
  const log = $("log");
  const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 80;
  const div = render(m);
  const old = shown.get(m.id);
  if (old) old.replaceWith(div); else log.appendChild(div);
  shown.set(m.id, div);
  if (atBottom || !old) {
    log.scrollTop = log.scrollHeight;
    // images take their height only once loaded: scroll again then, so the newest result is fully in view
    for (const img of div.querySelectorAll("img")) {
      if (!img.complete) img.addEventListener("load", () => { log.scrollTop = log.scrollHeight; }, { once: true });
    }
  }
}

async function post(url, body) {
  const init = body instanceof FormData ? { method: "POST", body } :
    { method: "POST", body: JSON.stringify(body), headers: { "Content-Type": "application/json" } };
  const resp = await fetch(url, init);
  const data = await resp.json().catch(() => ({ error: "the server answered " + resp.status }));
  showError(data.error || "");
  return data;
}

// One tap copies "@name" for a friend's /morph. Without the clipboard API (a page served over plain http to
// another machine, an old browser) the name is selected instead, ready for the device's own copy.
async function copyNickname() {
  const handle = $("handle"), button = $("copy");
  let copied = false;
  try {
    await navigator.clipboard.writeText(handle.textContent);
    copied = true;
  } catch (e) {
    getSelection().selectAllChildren(handle);
    try { copied = document.execCommand("copy"); } catch (e2) { copied = false; }
  }
  button.textContent = copied ? "copied" : "selected: copy it";
  clearTimeout(copyNickname.timer);
  copyNickname.timer = setTimeout(() => { button.textContent = "copy"; }, 2000);
}

async function react(messageId, action) {
  await post("/react", { message: messageId, action });
}

async function refreshInfo() {
  try {
    const resp = await fetch("/info");
    const info = await resp.json();
    const badge = $("engine");
    if (!resp.ok) {  // the storage is away or busy: say so; whether the engine runs is not known then
      badge.textContent = (info.error || "the server answered " + resp.status).split(/[;:]/)[0];
      badge.title = info.error || "";
      badge.classList.add("offline");
      return info;
    }
    actions = info.actions;
    badge.textContent = info.model ? "model: " + info.model :
      info.restarting ? "engine restarting: jobs wait" : "engine offline: jobs wait";
    badge.title = "the model the engine runs";
    badge.classList.toggle("offline", !info.model);
    const first = info.first_answers ? "first guesses: ready" :
      info.preparing && info.model ? "first guesses: " + info.preparing : "";
    $("first").hidden = !first;
    if ($("first").textContent !== first) $("first").textContent = first;
    $("tiny").hidden = !info.tiny;
    $("download").textContent = info.download;
    $("join").hidden = !!info.nickname;
    $("composer").hidden = !info.nickname;
    $("me").hidden = !info.nickname;
    const handle = info.nickname ? "@" + info.nickname : "";
    if ($("handle").textContent !== handle) $("handle").textContent = handle;  // rewriting it drops a selection
    if (info.nickname) document.title = "stylebot: @" + info.nickname;
    return info;
  } catch (e) {
    $("engine").textContent = "server unreachable";
  }
}

function listen() {
  const source = new EventSource("/events");
  source.onmessage = (e) => {
    const ev = JSON.parse(e.data);
    if (ev.type === "history") ev.messages.forEach(show);
    else if (ev.type === "message" || ev.type === "update") show(ev.message);
    else if (ev.type === "reset") location.reload();  // after /forget: an empty chat, and a new nickname to choose
  };
}

function setup() {
  $("copy").addEventListener("click", copyNickname);
  $("join").addEventListener("submit", async (e) => {
    e.preventDefault();
    const data = await post("/nickname", { nickname: $("nickname").value });
    if (data.nickname) refreshInfo();
  });
  const photo = $("photo");
  photo.addEventListener("change", () => {
    const f = photo.files[0];
    $("chosen").hidden = !f;
    $("chosen").textContent = f ? f.name + " (remove)" : "";
  });
  $("chosen").addEventListener("click", () => { photo.value = ""; photo.dispatchEvent(new Event("change")); });
  $("composer").addEventListener("submit", async (e) => {
    e.preventDefault();
    const form = new FormData();
    form.append("text", $("text").value);
    if (photo.files[0]) form.append("photo", photo.files[0]);
    $("send").disabled = true;
    try {
      const data = await post("/command", form);
      if (!data.error) {
        $("text").value = "";
        photo.value = "";
        photo.dispatchEvent(new Event("change"));
      }
    } finally {
      $("send").disabled = false;
      $("text").focus();
    }
  });
  refreshInfo().then(listen);
  setInterval(refreshInfo, 5000);
}

setup();
