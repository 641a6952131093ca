// The dashboard's only script: the browser's time zone, copy buttons, confirmations.
(function () {
  "use strict";
  var zone = "UTC";
  try { zone = Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC"; } catch (e) { /* old browser */ }
  if (/^[A-Za-z0-9_+\-\/]{1,64}$/.test(zone)) {
    // The server reads it to draw days (chart, "today", date filters) in this zone.
    document.cookie = "tz=" + zone + "; path=/dashboard; max-age=31536000; samesite=lax";
  }

  var styles = {
    date: { year: "numeric", month: "2-digit", day: "2-digit" },
    datetime: { year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit" },
    seconds: { year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit", second: "2-digit" }
  };

  function localTimes() {
    document.querySelectorAll("time[datetime]").forEach(function (el) {
      var when = new Date(el.getAttribute("datetime"));
      if (isNaN(when)) { return; }
      var style = styles[el.dataset.style] || styles.datetime;
      el.textContent = new Intl.DateTimeFormat(undefined, style).format(when);
      el.title = when.toISOString();
    });
    var name = document.getElementById("tz-name");
    if (name) { name.textContent = zone; }
  }

  function copy(button) {
    var source = document.querySelector(button.dataset.copy);
    if (!source) { return; }
    var text = source.textContent.trim();
    var done = function () {
      var label = button.textContent;
      button.textContent = "Copied";
      setTimeout(function () { button.textContent = label; }, 1500);
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, function () { select(source); });
    } else {
      select(source);
      try { if (document.execCommand("copy")) { done(); } } catch (e) { /* selected: the user copies */ }
    }
  }

  function select(el) {
    var range = document.createRange();
    range.selectNodeContents(el);
    var selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest("button[data-copy]");
    if (button) { copy(button); }
  });
  document.addEventListener("submit", function (event) {
    var message = event.target.dataset.confirm;
    if (message && !window.confirm(message)) { event.preventDefault(); }
  });
  localTimes();
})();
