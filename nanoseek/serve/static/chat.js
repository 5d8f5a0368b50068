// The chat page. The conversation lives in `history` (the page's memory, sent back whole with
// every request, as the API is stateless); replies stream from /v1/chat/completions as
// Server-Sent Events. A reply's reasoning (reasoning_content, R1-style models) goes into a
// collapsible <details>, its answer below. No build step, no libraries.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];      // [{role, content}], the turns so far (answers only, no reasoning)
let modelId = null;      // from /v1/models
let controller = null;   // AbortController of the reply being streamed, null when idle

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    modelId = body.data[0].id;
    $("model").textContent = modelId;
  } catch (e) {
    $("model").textContent = "not ready: " + e.message + " (retrying)";
    setTimeout(loadModel, 2000);
  }
}

// One message bubble; an assistant bubble gets a (hidden until used) reasoning section.
function addMessage(role, text) {
  const el = document.createElement("div");
  el.className = "msg " + role;
  const parts = { el };
  if (role === "assistant") {
    parts.reasoning = document.createElement("details");
    parts.reasoning.className = "reasoning";
    parts.reasoning.hidden = true;
    parts.reasoning.innerHTML = "<summary>Thinking</summary>";
    parts.reasoningText = document.createElement("div");
    parts.reasoningText.className = "text";
    parts.reasoning.appendChild(parts.reasoningText);
    el.appendChild(parts.reasoning);
  }
  parts.content = document.createElement("div");
  parts.content.className = "content";
  parts.content.textContent = text || "";
  el.appendChild(parts.content);
  $("messages").appendChild(el);
  el.scrollIntoView({ block: "end" });
  return parts;
}

// Yield the JSON objects of an SSE response body until "data: [DONE]".
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function send(text) {
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const reply = addMessage("assistant");
  reply.el.dataset.state = "streaming";
  controller = new AbortController();
  $("send").textContent = "Stop";
  let answer = "", failed = false, chunks = 0;
  try {
    const system = $("system").value.trim();
    const messages = system ? [{ role: "system", content: system }, ...history] : history;
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({
        model: modelId || undefined, messages, stream: true,
        max_tokens: Number($("max-tokens").value) || 256,
        temperature: Number($("temperature").value),
      }),
    });
    if (!r.ok) {
      const body = await r.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : r.status + " " + r.statusText);
    }
    for await (const chunk of sseEvents(r)) {
      if (chunk.error) throw new Error(chunk.error.message);
      reply.el.dataset.chunks = ++chunks;
      const delta = (chunk.choices[0] || {}).delta || {};
      if (delta.reasoning_content) {
        reply.reasoning.hidden = false;
        reply.reasoningText.textContent += delta.reasoning_content;
      }
      if (delta.content) {
        answer += delta.content;
        reply.content.textContent = answer;
      }
      reply.el.scrollIntoView({ block: "end" });
    }
  } catch (e) {
    if (e.name !== "AbortError") {
      failed = true;
      const err = document.createElement("div");
      err.className = "error";
      err.textContent = "Error: " + e.message;
      reply.el.appendChild(err);
    }
  } finally {
    // A stopped reply stays in the conversation as far as it got; a failed turn is dropped.
    if (failed) history.pop();
    else history.push({ role: "assistant", content: answer });
    reply.el.dataset.state = "done";
    controller = null;
    $("send").textContent = "Send";
  }
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  if (controller) { controller.abort(); return; }  // the button reads "Stop" while streaming
  const text = $("input").value.trim();
  if (!text) return;
  $("input").value = "";
  send(text);
});

$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    $("composer").requestSubmit();
  }
});

$("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  history.length = 0;
  $("messages").replaceChildren();
  $("input").focus();
});

$("api-key").addEventListener("change", loadModel);
loadModel();
