// The slm playground: chat with a served model, or send one prompt to two or three and compare them.
// Everything goes through the server's OpenAI API (/v1/chat/completions, streamed), as any client's calls
// would; /ui/models adds each model's kind and price. The conversation and the parameters stay in this
// browser (localStorage), the API key too once typed.
"use strict";

const $ = (id) => document.getElementById(id);
const KEYS = { chat: "slm.chat", params: "slm.params", key: "slm.key", compare: "slm.compare" };
const PARAMS = ["system", "temperature", "top-p", "max-tokens", "schema"];

const state = {
  models: [],
  key: localStorage.getItem(KEYS.key) || "",
  chat: stored(KEYS.chat, []),
  running: null, // the AbortController of the chat's answer in flight
  comparing: null, // ...and of the comparison's
};

class ApiError extends Error {}

function stored(key, fallback) {
  try {
    const value = JSON.parse(localStorage.getItem(key));
    return value ?? fallback;
  } catch {
    return fallback;
  }
}

function store(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
  } catch {
    showError("this browser's storage is full: the conversation is not kept past this page");
  }
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

// --- the server ----------------------------------------------------------------------------------------

async function call(path, body, signal) {
  const headers = { "Content-Type": "application/json" };
  if (state.key) headers.Authorization = `Bearer ${state.key}`;
  const response = await fetch(path, {
    method: body ? "POST" : "GET", headers, signal, body: body ? JSON.stringify(body) : undefined,
  });
  if (response.status === 401) {
    askForKey(state.key ? "That key was refused: type the server's API key" : "This server needs an API key");
    throw new ApiError("the server needs an API key");
  }
  if (!response.ok) throw new ApiError(await errorOf(response));
  return response;
}

async function errorOf(response) {
  try {
    const body = await response.json();
    const error = body.error ?? body;
    return typeof error === "string" ? error : error.message || JSON.stringify(error);
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function* events(response) {
  // Server-sent events: "data: {...}" blocks separated by blank lines, up to "data: [DONE]".
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

function requestOptions() {
  const options = {
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    max_tokens: Math.max(1, Math.round(Number($("max-tokens").value) || 512)),
  };
  const schema = $("schema").value.trim();
  if (schema) {
    let parsed;
    try {
      parsed = JSON.parse(schema);
    } catch (e) {
      throw new ApiError(`JSON schema: not valid JSON (${e.message})`);
    }
    options.response_format = { type: "json_schema", json_schema: { name: "answer", schema: parsed } };
  }
  return options;
}

function withSystem(messages) {
  const system = $("system").value.trim();
  return system ? [{ role: "system", content: system }, ...messages] : messages;
}

// Streams one answer of `model` to `messages`, handing each piece of text to `onText`; returns its figures.
async function complete(model, messages, signal, onText) {
  const body = { model, messages: withSystem(messages), stream: true, stream_options: { include_usage: true },
                 ...requestOptions() };
  const sent = performance.now();
  let first = null, last = null, pieces = 0, usage = null, finish = null;
  try {
    const response = await call("/v1/chat/completions", body, signal);
    for await (const chunk of events(response)) {
      if (chunk.error) throw new ApiError(chunk.error.message || JSON.stringify(chunk.error));
      if (chunk.usage) usage = chunk.usage;
      const choice = (chunk.choices || [])[0];
      if (!choice) continue;
      const text = choice.delta?.content || "";
      if (text) {
        last = performance.now();
        if (first === null) first = last;
        pieces += 1;
        onText(text);
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
  } catch (e) {
    if (e.name !== "AbortError") throw e;
    finish = "stopped";
  }
  const price = priceOf(model);
  const completion = usage ? usage.completion_tokens : pieces; // stopped: the pieces seen, about one a token
  const prompt = usage ? usage.prompt_tokens : null;
  return {
    model, finish,
    ttft: first === null ? null : (first - sent) / 1000,
    rate: first !== null && last > first && completion > 1 ? (completion - 1) / ((last - first) / 1000) : null,
    prompt, completion, exact: Boolean(usage),
    cost: (prompt ?? 0) * price.input / 1e6 + completion * price.output / 1e6,
  };
}

function priceOf(model) {
  return state.models.find((m) => m.id === model)?.price ?? { input: 0, output: 0 };
}

// --- models and the API key --------------------------------------------------------------------------------

async function loadModels() {
  const response = await call("/ui/models");
  state.models = (await response.json()).models.filter((m) => m.kind !== "embedding");
  $("key-form").hidden = true;
  const selects = [$("chat-model"), ...document.querySelectorAll(".compare-model")];
  for (const select of selects) {
    const chosen = select.value;
    select.replaceChildren();
    if (select.id === "compare-model-3") select.append(new Option("(none)", ""));
    for (const model of state.models) select.append(new Option(`${model.id} (${model.kind})`, model.id));
    if (chosen) select.value = chosen;
  }
  const saved = stored(KEYS.compare, null);
  const ids = state.models.map((m) => m.id);
  if (saved && saved.every((id) => id === "" || ids.includes(id))) {
    document.querySelectorAll(".compare-model").forEach((select, i) => { select.value = saved[i] ?? ""; });
  } else if (ids.length > 1) {
    $("compare-model-2").value = ids[1];
  }
  const last = [...state.chat].reverse().find((m) => m.model);
  if (last && ids.includes(last.model)) $("chat-model").value = last.model;
}

function askForKey(message) {
  const form = $("key-form");
  form.querySelector("label").textContent = message;
  form.hidden = false;
  $("api-key").focus();
}

$("key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  state.key = $("api-key").value.trim();
  localStorage.setItem(KEYS.key, state.key);
  try {
    await loadModels();
    showError("");
  } catch (e) {
    showError(e.message);
  }
});

// --- views -------------------------------------------------------------------------------------------------

function showView(name) {
  for (const view of ["chat", "compare"]) {
    const tab = $(`tab-${view}`);
    tab.setAttribute("aria-selected", String(view === name));
    tab.tabIndex = view === name ? 0 : -1;
    $(`view-${view}`).hidden = view !== name;
  }
}

for (const view of ["chat", "compare"]) $(`tab-${view}`).addEventListener("click", () => showView(view));
document.querySelector("[role=tablist]").addEventListener("keydown", (event) => {
  if (event.key !== "ArrowLeft" && event.key !== "ArrowRight") return;
  const next = $("tab-chat").getAttribute("aria-selected") === "true" ? "compare" : "chat";
  showView(next);
  $(`tab-${next}`).focus();
});

// --- parameters --------------------------------------------------------------------------------------------

function restoreParams() {
  const saved = stored(KEYS.params, {});
  for (const id of PARAMS) if (typeof saved[id] === "string") $(id).value = saved[id];
}

for (const id of PARAMS) {
  $(id).addEventListener("change", () => store(KEYS.params, Object.fromEntries(PARAMS.map((p) => [p, $(p).value]))));
}

function readImage() {
  const file = $("image").files[0];
  if (!file) return Promise.resolve(null);
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new ApiError(`cannot read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

// --- chat --------------------------------------------------------------------------------------------------

function textOf(content) {
  return typeof content === "string" ? content : content.filter((p) => p.type === "text").map((p) => p.text).join("");
}

function figuresText(f) {
  const parts = [];
  if (f.ttft !== null) parts.push(`first token ${f.ttft.toFixed(2)} s`);
  if (f.rate !== null) parts.push(`${f.rate.toFixed(1)} tokens/s`);
  parts.push(`${f.exact ? "" : "≈"}${f.completion} tokens`);
  if (f.finish === "stopped") parts.push("stopped");
  else if (f.finish === "length") parts.push("cut at max tokens");
  return parts.join(" · ");
}

function renderMessage(message) {
  const item = document.createElement("li");
  item.className = `message ${message.role}`;
  const who = document.createElement("strong");
  who.textContent = message.role === "user" ? "You" : message.model || "Assistant";
  const body = document.createElement("div");
  body.className = "content";
  body.textContent = textOf(message.content);
  item.append(who, body);
  if (Array.isArray(message.content)) {
    for (const part of message.content.filter((p) => p.type === "image_url")) {
      const image = document.createElement("img");
      image.src = part.image_url.url;
      image.alt = "attached image";
      item.append(image);
    }
  }
  const figures = document.createElement("p");
  figures.className = "figures";
  if (message.figures) figures.textContent = figuresText(message.figures);
  item.append(figures);
  $("messages").append(item);
  return item;
}

function renderChat() {
  $("messages").replaceChildren();
  state.chat.forEach(renderMessage);
  setChatBusy(false);
}

function setChatBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("regenerate").disabled = busy || !state.chat.some((m) => m.role === "user");
}

async function answer() {
  const model = $("chat-model").value;
  if (!model) {
    showError("no model to answer: the server lists none that generates text");
    return;
  }
  const history = state.chat.map(({ role, content }) => ({ role, content }));
  const message = { role: "assistant", model, content: "" };
  const item = renderMessage(message);
  item.setAttribute("aria-busy", "true");
  const body = item.querySelector(".content");
  state.running = new AbortController();
  setChatBusy(true);
  showError("");
  try {
    message.figures = await complete(model, history, state.running.signal, (text) => {
      message.content += text;
      body.textContent = message.content;
      item.scrollIntoView({ block: "end" });
    });
    item.querySelector(".figures").textContent = figuresText(message.figures);
    state.chat.push(message);
  } catch (e) {
    if (message.content) state.chat.push(message); // keep what came before the error
    else item.remove();
    showError(e.message);
  } finally {
    item.removeAttribute("aria-busy");
    state.running = null;
    store(KEYS.chat, state.chat);
    setChatBusy(false);
  }
}

$("chat-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  if (state.running) return;
  const text = $("prompt").value.trim();
  if (!text) return;
  let image;
  try {
    requestOptions(); // a schema that is not JSON is refused before the message is taken
    image = await readImage();
  } catch (e) {
    showError(e.message);
    return;
  }
  showError(""); // what was wrong before is not the news now
  const content = image ? [{ type: "text", text }, { type: "image_url", image_url: { url: image } }] : text;
  const message = { role: "user", content };
  state.chat.push(message);
  renderMessage(message);
  $("prompt").value = "";
  $("image").value = "";
  await answer();
});

$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("chat-form").requestSubmit();
  }
});

$("stop").addEventListener("click", () => state.running?.abort());

$("regenerate").addEventListener("click", async () => {
  while (state.chat.length && state.chat[state.chat.length - 1].role === "assistant") state.chat.pop();
  store(KEYS.chat, state.chat);
  renderChat();
  await answer();
});

$("new-chat").addEventListener("click", () => {
  state.running?.abort();
  state.chat = [];
  store(KEYS.chat, state.chat);
  renderChat();
  $("prompt").focus();
});

// --- compare -----------------------------------------------------------------------------------------------

function formatCost(dollars) {
  if (dollars === 0) return "$0";
  return dollars < 0.01 ? `$${dollars.toPrecision(2)}` : `$${dollars.toFixed(4)}`;
}

function column(model) {
  const box = document.createElement("article");
  box.className = "column";
  box.setAttribute("aria-busy", "true");
  const title = document.createElement("h2");
  title.textContent = model;
  const answerBox = document.createElement("div");
  answerBox.className = "content";
  const figures = document.createElement("dl");
  figures.className = "figures";
  box.append(title, answerBox, figures);
  $("columns").append(box);
  return box;
}

function showFigures(box, f) {
  const rows = [
    ["First token", f.ttft === null ? "–" : `${f.ttft.toFixed(2)} s`],
    ["Tokens/s", f.rate === null ? "–" : f.rate.toFixed(1)],
    ["Tokens", `${f.prompt ?? "?"} in, ${f.exact ? "" : "≈"}${f.completion} out`],
    ["Cost", `${f.exact ? "" : "≈"}${formatCost(f.cost)}`],
  ];
  if (f.finish === "stopped") rows.push(["Stopped", "yes"]);
  const list = box.querySelector(".figures");
  list.replaceChildren();
  for (const [name, value] of rows) {
    const term = document.createElement("dt");
    term.textContent = name;
    const data = document.createElement("dd");
    data.textContent = value;
    data.dataset.figure = name.toLowerCase();
    list.append(term, data);
  }
}

function drawChart(results) {
  // Two groups of horizontal bars, one bar a model: tokens/s, then time to first token.
  const svg = $("chart-svg");
  const ns = "http://www.w3.org/2000/svg";
  const rowHeight = 22, labelWidth = 150, width = 560, barWidth = width - labelWidth - 80;
  const groups = [
    ["tokens/s", (r) => r.rate, (v) => v.toFixed(1)],
    ["first token (s)", (r) => r.ttft, (v) => v.toFixed(2)],
  ];
  svg.replaceChildren();
  let y = 0;
  const add = (name, attributes, text) => {
    const node = document.createElementNS(ns, name);
    for (const [k, v] of Object.entries(attributes)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    svg.append(node);
  };
  for (const [title, value, format] of groups) {
    add("text", { x: 0, y: y + 14, class: "chart-title" }, title);
    y += rowHeight;
    const top = Math.max(...results.map((r) => value(r) ?? 0), 1e-9);
    results.forEach((r, i) => {
      const v = value(r);
      add("text", { x: 0, y: y + 14, class: "chart-label" }, r.model);
      add("rect", { x: labelWidth, y: y + 3, height: rowHeight - 8, width: v ? Math.max(2, (v / top) * barWidth) : 0,
                    class: `bar bar-${i}`, "data-model": r.model, "data-metric": title });
      add("text", { x: labelWidth + (v ? (v / top) * barWidth : 0) + 6, y: y + 14, class: "chart-value" },
          v === null ? "–" : format(v));
      y += rowHeight;
    });
    y += 8;
  }
  svg.setAttribute("viewBox", `0 0 ${width} ${y}`);
  $("chart").hidden = false;
}

$("compare-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  if (state.comparing) return;
  const prompt = $("compare-prompt").value.trim();
  const models = [...document.querySelectorAll(".compare-model")].map((s) => s.value).filter(Boolean);
  if (!prompt) return;
  if (models.length < 2) {
    showError("pick two or three models to compare");
    return;
  }
  try {
    requestOptions();
  } catch (e) {
    showError(e.message);
    return;
  }
  store(KEYS.compare, [...document.querySelectorAll(".compare-model")].map((s) => s.value));
  showError("");
  $("columns").replaceChildren();
  $("chart").hidden = true;
  state.comparing = new AbortController();
  $("compare-run").disabled = true;
  $("compare-stop").disabled = false;
  const messages = [{ role: "user", content: prompt }];
  const runs = models.map(async (model) => {
    const box = column(model);
    const content = box.querySelector(".content");
    try {
      const figures = await complete(model, messages, state.comparing.signal, (text) => { content.textContent += text; });
      showFigures(box, figures);
      return figures;
    } catch (e) {
      const error = document.createElement("p");
      error.className = "column-error";
      error.setAttribute("role", "alert");
      error.textContent = e.message;
      box.append(error);
      return null;
    } finally {
      box.removeAttribute("aria-busy");
    }
  });
  const results = (await Promise.all(runs)).filter(Boolean);
  state.comparing = null;
  $("compare-run").disabled = false;
  $("compare-stop").disabled = true;
  if (results.length) drawChart(results);
});

$("compare-stop").addEventListener("click", () => state.comparing?.abort());

// --- start -------------------------------------------------------------------------------------------------

restoreParams();
renderChat();
loadModels().catch((e) => { if (!(e instanceof ApiError && $("key-form").hidden === false)) showError(e.message); });
