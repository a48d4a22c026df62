  // The page of a mailed link: POSTs the link's token, and the form's password, to
  // the form's data-action. The token is in the link's fragment, which no server and
  // no log sees; it leaves the address bar and the history at once. Only a click
  // sends it: mail scanners that open links use none up.
  const token = new URLSearchParams(location.hash.slice(1)).get("token");
  history.replaceState(null, "", location.pathname + location.search);
  const form = document.querySelector("form");
  const result = document.getElementById("result");

  function show(text, done) {
    result.textContent = text;
    result.className = done ? "done" : "failed";
  }

  async function problem(response) {
    const known = { 400: form.dataset.badLink, 403: form.dataset.wrongPassword };
    if (known[response.status]) return known[response.status];
    if (response.status === 429) {
      return `Too many tries: try again in ${response.headers.get("Retry-After")} s.`;
    }
    const body = await response.json().catch(() => ({}));
    if (Array.isArray(body.detail)) return body.detail.map((error) => error.msg).join("; ");
    return body.detail || `The server answered ${response.status}; try again later.`;
  }

  if (!token) {
    form.hidden = true;
    show("This link has no token: open the whole link from the mail.", false);
  }
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    form.querySelector("button").disabled = true;
    result.textContent = "";
    try {
      const response = await fetch(form.dataset.action, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ token, password: form.password.value }),
      });
      if (response.ok) {
        form.hidden = true;
        show(form.dataset.done, true);
        return;
      }
      show(await problem(response), false);
    } catch {
      show("The server could not be reached; try again.", false);
    }
    form.querySelector("button").disabled = false;
  });
