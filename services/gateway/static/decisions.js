/*
 * The page of the plain `decisions` experiment: one slider from 0 to 1; every member's number
 * is relayed to the group and charted (no payoffs).
 */
import { decisionsChart, startPage } from "./page.js";

let slider = null;

startPage({
  title: "Decisions",
  mount(page) {
    slider = page.slider({
      min: 0,
      max: 1,
      step: 0.01,
      initial: 0.5,
      label: "Your decision, from 0 to 1",
      help: "Move the slider to choose a number between 0 and 1. You can change it at any " +
        "time while the period is running.",
    });
    page.el.experiment.append(...slider.nodes);
  },
  render() {
    slider.render();
  },
  chart: decisionsChart({ yLabel: "decision" }),
});
