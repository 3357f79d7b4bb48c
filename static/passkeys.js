// Passkeys: add one on /account/security, sign in with one on /login.
// Progressive enhancement: the forms stay hidden unless this browser can use passkeys; the server
// verifies everything. Each ceremony asks the server for options (JSON), runs the browser's WebAuthn
// call, then submits the answer as an ordinary form, so cookies and redirects work as for any form.
(function () {
  "use strict";
  if (!window.PublicKeyCredential || !navigator.credentials || !window.fetch) { return; }

  function toBytes(text) {
    var b64 = text.replace(/-/g, "+").replace(/_/g, "/");
    var raw = atob(b64 + "===".slice((b64.length + 3) % 4));
    var out = new Uint8Array(raw.length);
    for (var i = 0; i < raw.length; i++) { out[i] = raw.charCodeAt(i); }
    return out.buffer;
  }
  function toText(buffer) {
    var bytes = new Uint8Array(buffer), raw = "";
    for (var i = 0; i < bytes.length; i++) { raw += String.fromCharCode(bytes[i]); }
    return btoa(raw).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }
  function creationOptions(json) {
    if (PublicKeyCredential.parseCreationOptionsFromJSON) { return PublicKeyCredential.parseCreationOptionsFromJSON(json); }
    json.challenge = toBytes(json.challenge);
    json.user.id = toBytes(json.user.id);
    (json.excludeCredentials || []).forEach(function (c) { c.id = toBytes(c.id); });
    return json;
  }
  function requestOptions(json) {
    if (PublicKeyCredential.parseRequestOptionsFromJSON) { return PublicKeyCredential.parseRequestOptionsFromJSON(json); }
    json.challenge = toBytes(json.challenge);
    (json.allowCredentials || []).forEach(function (c) { c.id = toBytes(c.id); });
    return json;
  }
  function credentialJSON(cred) {
    if (typeof cred.toJSON === "function") { return cred.toJSON(); }
    var r = cred.response, response = {clientDataJSON: toText(r.clientDataJSON)};
    if (r.attestationObject) {
      response.attestationObject = toText(r.attestationObject);
      response.transports = r.getTransports ? r.getTransports() : [];
    } else {
      response.authenticatorData = toText(r.authenticatorData);
      response.signature = toText(r.signature);
      if (r.userHandle) { response.userHandle = toText(r.userHandle); }
    }
    return {id: cred.id, rawId: toText(cred.rawId), type: cred.type, response: response,
            authenticatorAttachment: cred.authenticatorAttachment || null,
            clientExtensionResults: cred.getClientExtensionResults ? cred.getClientExtensionResults() : {}};
  }
  function explain(err) {
    if (err && err.name === "NotAllowedError") { return "Cancelled, or no passkey was chosen."; }
    if (err && err.name === "InvalidStateError") { return "This device already has a passkey for this account."; }
    if (err && err.name === "SecurityError") { return "Passkeys do not work at this address. Open the site at its usual address."; }
    return (err && err.message) || "Something went wrong. Try again.";
  }

  // One ceremony: fetch the options, run the browser's call, submit the form with its answer.
  function ceremony(form, button, status, run) {
    var xsrf = form.querySelector("input[name=_xsrf]").value;
    // Adding a passkey from an older session (or one that moved) needs the password too.
    var password = form.querySelector("input[name=password]");
    button.disabled = true;
    status.textContent = "Follow your browser's prompt…";
    fetch(form.getAttribute("data-options"), {
      method: "POST", credentials: "same-origin",
      headers: {"Content-Type": "application/x-www-form-urlencoded"},
      body: "_xsrf=" + encodeURIComponent(xsrf) + (password ? "&password=" + encodeURIComponent(password.value) : "")
    }).then(function (response) {
      return response.json().then(function (json) {
        if (json.reauth && !password) {  // the page was loaded while the sign-in was fresh: ask again
          window.location.assign(window.location.pathname + "?done=reauth");
          return new Promise(function () {});
        }
        if (!response.ok) { throw new Error(json.error || "The site refused: try again."); }
        return run(json);
      });
    }).then(function (cred) {
      form.querySelector("input[name=credential]").value = JSON.stringify(credentialJSON(cred));
      status.textContent = "Checking…";
      form.submit();
    }).catch(function (err) {
      status.textContent = explain(err);
      button.disabled = false;
    });
  }

  var add = document.getElementById("passkey-add-form");
  if (add) {
    var addButton = document.getElementById("passkey-add");
    add.hidden = false;
    document.querySelectorAll("[data-passkey-fallback]").forEach(function (el) { el.hidden = true; });
    addButton.addEventListener("click", function () {
      ceremony(add, addButton, document.getElementById("passkey-status"), function (json) {
        return navigator.credentials.create({publicKey: creationOptions(json)});
      });
    });
    // Enter in the name field adds the passkey rather than submitting an empty answer.
    add.addEventListener("submit", function (event) {
      if (!add.querySelector("input[name=credential]").value) { event.preventDefault(); addButton.click(); }
    });
  }

  var login = document.getElementById("passkey-login-form");
  if (login) {
    var loginButton = document.getElementById("passkey-login");
    login.hidden = false;
    loginButton.addEventListener("click", function () {
      ceremony(login, loginButton, document.getElementById("passkey-status"), function (json) {
        return navigator.credentials.get({publicKey: requestOptions(json)});
      });
    });
  }
})();
