// The sign-in, first-run setup and pager sign-in forms: each posts its
// fields as JSON to the endpoint in its data-endpoint attribute.
"use strict";

function localNext(fallback) {
  // Only a path on this gateway: never an address elsewhere.
  const next = new URLSearchParams(location.search).get("next");
  return next && next.startsWith("/") && !next.startsWith("//") ? next : fallback;
}

for (const form of document.querySelectorAll("form[data-endpoint]")) {
  const problem = form.querySelector(".problem");
  form.addEventListener("submit", async event => {
    event.preventDefault();
    const fields = Object.fromEntries(new FormData(form));
    if (fields.again !== undefined) {
      if (fields.again !== fields.password) {
        problem.textContent = "The two passwords differ.";
        return;
      }
      delete fields.again;
    }
    problem.textContent = "";
    form.querySelector("button").disabled = true;
    try {
      await gw.api("POST", form.dataset.endpoint, fields);
      location.href = localNext(form.dataset.next);
    } catch (error) {
      problem.textContent = error.message;
    } finally {
      form.querySelector("button").disabled = false;
    }
  });
}
