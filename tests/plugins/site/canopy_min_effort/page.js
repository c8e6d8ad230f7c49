// The participant page of the min_effort plug-in: one button per effort level, on the shell
// every Canopy page shares (countdown, waiting screen, payoffs, group, chart). The gateway
// serves it at /static/plugins/min_effort.js: the experiment's class says page = "page.js".
import { decisionsChart, h, startPage } from "/static/page.js";

const buttons = [];

startPage({
  title: "Minimum effort",
  mount(page) {
    const top = page.config.params.max_effort; // params come with their defaults filled in
    const group = h("div", { role: "group", "aria-labelledby": "effort-label", class: "efforts" });
    for (let effort = 1; effort <= top; effort++) {
      const button = h("button", { type: "button", text: String(effort), "data-effort": effort });
      button.addEventListener("click", () => page.client.decide(effort));
      buttons.push(button);
      group.append(button);
    }
    page.el.experiment.append(
      h("p", { id: "effort-label", text: `Your effort, from 1 to ${top}` }),
      group,
      h("p", { class: "help", text: "Everyone earns more when the lowest effort is higher; " +
        "effort above the lowest costs you." }),
    );
  },
  render(page) {
    const mine = page.client.state.groupDecisions[page.me()];
    for (const button of buttons) {
      button.disabled = !page.running();
      button.setAttribute("aria-pressed", String(Number(button.dataset.effort) === mine));
    }
  },
  chart: decisionsChart({ yLabel: "effort" }),
});
