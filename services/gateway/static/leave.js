/*
 * Leaving for a completion site (PROTOCOL v2 "Online studies"): a visible countdown, then
 * location.assign(url). Used by the participant page's finished screen (page.js) and, on its
 * own, by the study link's "this study is full" page, whose `[data-redirect]` element it
 * starts by itself (`data-seconds`, the seconds shown in its `.leaving-seconds`).
 *
 * Only http(s) targets are followed: the store only accepts those, and a page must never run a
 * `javascript:` address whatever a message says.
 */

export const LEAVE_SECONDS = 5;

export function safeTarget(url) {
  if (typeof url !== "string" || url === "") return null;
  try {
    const parsed = new URL(url, location.href);
    return parsed.protocol === "http:" || parsed.protocol === "https:" ? parsed.href : null;
  } catch {
    return null;
  }
}

/**
 * Count down from `seconds` in `secondsEl` (its text), then go to `url`. Returns a function
 * that stops the countdown; null when `url` is not an http(s) address.
 */
export function leaveAfter(url, seconds, secondsEl, go) {
  const target = safeTarget(url);
  if (target === null) return null;
  go = go || ((to) => location.assign(to));
  const deadline = Date.now() + seconds * 1000;
  let timer = null;
  function tick() {
    const left = Math.max(0, Math.ceil((deadline - Date.now()) / 1000));
    if (secondsEl) {
      secondsEl.textContent = String(left);
      secondsEl.dataset.left = String(left);
    }
    if (left <= 0) {
      timer = null;
      go(target);
      return;
    }
    // Wake at the next whole second, so the number shown is never a second off.
    timer = setTimeout(tick, ((deadline - Date.now()) % 1000) || 1000);
  }
  tick();
  return function stop() {
    if (timer !== null) clearTimeout(timer);
    timer = null;
  };
}

document.querySelectorAll("[data-redirect]").forEach((node) => {
  const seconds = parseInt(node.dataset.seconds, 10);
  leaveAfter(node.dataset.redirect, isFinite(seconds) ? seconds : LEAVE_SECONDS,
    node.querySelector(".leaving-seconds"));
});
