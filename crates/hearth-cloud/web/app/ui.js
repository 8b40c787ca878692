// A tiny DOM helper: elements are built with createElement, attributes
// with setAttribute and text with textContent, so nothing from a device,
// the cloud or the user is ever parsed as HTML, and no inline style or
// script is needed (the CSP allows neither).

export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const SVG = "http://www.w3.org/2000/svg";
export function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  for (const c of children.flat()) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

export function mount(...children) {
  const main = document.getElementById("main");
  main.replaceChildren(...children);
}

// A message for everyone (role=status); errors also go to an alert region
// so screen readers announce them at once.
export function flash(text, kind = "ok") {
  const box = document.getElementById("flash");
  box.replaceChildren(h("div", { class: `msg ${kind}`, role: kind === "error" ? "alert" : null, "data-flash": kind }, text));
}

export function clearFlash() {
  document.getElementById("flash").replaceChildren();
}

// Runs an async action from a button or form, disabling it meanwhile and
// showing any error as a message.
export async function busy(el, fn) {
  clearFlash();
  el.disabled = true;
  el.setAttribute("aria-busy", "true");
  try {
    return await fn();
  } catch (e) {
    flash(e.message || String(e), "error");
    return undefined;
  } finally {
    el.disabled = false;
    el.removeAttribute("aria-busy");
  }
}

export function field(label, input) {
  const id = input.id || `f-${Math.random().toString(36).slice(2, 9)}`;
  input.id = id;
  return [h("label", { for: id }, label), input];
}
