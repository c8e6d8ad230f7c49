// ESLint's configuration for `make lint` (package.json pins the version): the participant
// pages and client (services/gateway/static), the console (services/store/static) and the
// example plug-in's page. All are ES modules loaded by the browser as they are (no build
// step), so: browser globals, module scope, and the rules that keep them on the same modern
// syntax (const/let, arrow callbacks, template literals, shorthand) besides eslint's
// recommended set (unused variables, undefined globals, unreachable code …).
import js from "@eslint/js";
import globals from "globals";

export default [
  // Third-party code, vendored as released (services/common/static/vendor).
  { ignores: ["**/vendor/**", "node_modules/**"] },
  js.configs.recommended,
  {
    files: ["**/*.js"],
    languageOptions: {
      ecmaVersion: 2022,
      sourceType: "module",
      globals: globals.browser,
    },
    linterOptions: { reportUnusedDisableDirectives: "error" },
    rules: {
      "no-var": "error",
      "prefer-const": "error",
      "prefer-arrow-callback": "error",
      "prefer-template": "error",
      "object-shorthand": "error",
      "prefer-rest-params": "error",
      "prefer-spread": "error",
      "no-use-before-define": ["error", { functions: false, classes: true, variables: false }],
      eqeqeq: "error",
    },
  },
];
