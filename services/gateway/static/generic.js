/*
 * The page of an experiment without a page of its own (a plug-in): a decision is any JSON
 * value, typed in and sent on the `decisions` channel; numbers are charted. A plug-in can
 * ship a page of its own instead (docs/pages.md).
 */
import { decisionsChart, h, startPage } from "./page.js";

var input = null;
var button = null;
var note = null;

function send(page) {
  var text = input.value.trim();
  var value;
  try {
    value = JSON.parse(text);
  } catch (e) {
    note.textContent = "Not a valid value: type a number (like 3 or 0.5) or JSON text.";
    note.dataset.invalid = "true";
    return;
  }
  note.textContent = "Sent: " + JSON.stringify(value);
  note.dataset.invalid = "";
  page.client.decide(value);
}

startPage({
  title: "",
  mount: function (page) {
    var title = page.config.experiment || "Experiment";
    page.el.title.textContent = title;
    input = h("input", { id: "decision-input", type: "text", inputmode: "decimal",
      autocomplete: "off", "aria-describedby": "decision-help", disabled: true });
    button = h("button", { type: "submit", id: "decision-send", text: "Send", disabled: true });
    note = h("p", { id: "decision-note", class: "help", "aria-live": "polite" });
    var form = h("form", { class: "inline-form" },
      h("label", { for: "decision-input", text: "Your decision" }), input, button);
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      send(page);
    });
    page.el.experiment.append(form, h("p", { id: "decision-help", class: "help",
      text: "Type your decision (a number, or JSON text) and press Enter or Send. You can " +
        "change it at any time while the period is running." }), note);
  },
  render: function (page) {
    var off = !page.running();
    input.disabled = off;
    button.disabled = off;
  },
  chart: decisionsChart({ yLabel: "decision" }),
});
