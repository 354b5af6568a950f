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
