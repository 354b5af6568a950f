// restic-manager's page script: copy buttons. Everything else is plain HTML and htmx.
"use strict";
document.addEventListener("click", function (event) {
  var button = event.target.closest("button.copy");
  if (!button) return;
  var source = document.getElementById(button.dataset.copy);
  if (!source || !navigator.clipboard) return;
  navigator.clipboard.writeText(source.textContent).then(function () {
    button.textContent = "Copied";
    setTimeout(function () { button.textContent = "Copy"; }, 1500);
  });
});
// Copy buttons need JavaScript (and a secure context for the clipboard): show them only where they work.
document.addEventListener("DOMContentLoaded", function () {
  if (!navigator.clipboard) return;
  document.querySelectorAll("button.copy[hidden]").forEach(function (b) { b.hidden = false; });
});
document.addEventListener("htmx:afterSwap", function () {
  if (!navigator.clipboard) return;
  document.querySelectorAll("button.copy[hidden]").forEach(function (b) { b.hidden = false; });
});
// Asset uploads: htmx reports the upload's progress on the form; its <progress> shows it. A refused upload (4xx)
// is swapped in like a page, so its error is shown where the form was.
document.addEventListener("htmx:xhr:progress", function (event) {
  var form = event.target.closest && event.target.closest("form.upload");
  var bar = form && form.querySelector("progress");
  if (!bar || !event.detail.lengthComputable) return;
  bar.hidden = false;
  bar.max = event.detail.total;
  bar.value = event.detail.loaded;
});
document.addEventListener("htmx:beforeSwap", function (event) {
  // The event fires on the swap target (main); the form that sent the request is in the request's config.
  var sender = (event.detail.requestConfig && event.detail.requestConfig.elt) || event.detail.elt;
  var form = sender && sender.closest && sender.closest("form.upload, form.remove");
  var status = event.detail.xhr.status;
  if (form && status >= 400 && status < 500) {
    event.detail.shouldSwap = true;
    event.detail.isError = false;
  }
});
