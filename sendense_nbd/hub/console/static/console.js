// The console's own script: times in the browser's time zone, and htmx showing error answers.
// Everything else is htmx or plain HTML.
(function () {
  "use strict";
  var format = new Intl.DateTimeFormat(undefined, {
    year: "numeric", month: "2-digit", day: "2-digit",
    hour: "2-digit", minute: "2-digit", second: "2-digit", timeZoneName: "short"
  });

  function localTimes(root) {
    root.querySelectorAll("time[datetime]").forEach(function (element) {
      var when = new Date(element.getAttribute("datetime"));
      if (!isNaN(when.getTime()) && !element.dataset.local) {
        element.title = element.textContent;
        element.textContent = format.format(when);
        element.dataset.local = "1";
      }
    });
  }

  // An error answer (a sentence the hub drew) replaces the target like any other, so it is seen.
  if (window.htmx) {
    window.htmx.config.responseHandling = [{ code: "204", swap: false }, { code: "[2345]..", swap: true }];
  }

  document.addEventListener("DOMContentLoaded", function () { localTimes(document); });
  document.addEventListener("htmx:afterSwap", function (event) { localTimes(event.target); });
  document.addEventListener("htmx:sseMessage", function (event) { localTimes(event.target); });
})();
