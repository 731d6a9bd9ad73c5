"""Drive a rendered leaderboard in headless Chromium (Qt WebEngine, from PySide6) from file://.

    python tests/browser_check.py SITE_DIR SCREENSHOT.png

Opens ``index.html``, clicks the header of a numeric column of the first table with several
rows twice (ascending, then descending), follows the first model link and screenshots the model
page. Prints one JSON line with what it saw; the test asserts on it. Runs in its own
process because Qt wants its environment set before import and one application per process.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
if hasattr(os, "geteuid") and os.geteuid() == 0:  # Chromium refuses its sandbox as root
    os.environ["QTWEBENGINE_CHROMIUM_FLAGS"] = (os.environ.get("QTWEBENGINE_CHROMIUM_FLAGS", "") + " --no-sandbox").strip()

from PySide6.QtCore import QTimer, QUrl  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402
from PySide6.QtWebEngineWidgets import QWebEngineView  # noqa: E402

# In the first table with several rows, the numeric column with the most distinct values:
# its values after each click, and the first model link.
SORT_TWICE = """
(function () {
  var table = Array.prototype.find.call(document.querySelectorAll("table.board"),
                                        function (t) { return t.tBodies[0].rows.length > 1; });
  var headers = table.querySelectorAll("th.sortable");
  var rows = table.tBodies[0].rows;
  var col = -1, best = 0;
  for (var i = 0; i < headers.length; i++) {
    var seen = {}, n = 0, numeric = true;
    for (var r = 0; r < rows.length; r++) {
      var v = rows[r].cells[i].dataset.sort;
      if (v === "" || isNaN(parseFloat(v))) { numeric = false; break; }
      if (!seen[v]) { seen[v] = true; n++; }
    }
    if (numeric && n > best) { best = n; col = i; }
  }
  function values() {
    return Array.prototype.map.call(table.tBodies[0].rows, function (r) { return r.cells[col].dataset.sort; });
  }
  var before = values();
  headers[col].click();
  var ascending = values();
  headers[col].click();
  var descending = values();
  var link = document.querySelector("table.board a[href^='models/']");
  return JSON.stringify({column: headers[col].textContent, before: before, ascending: ascending,
                         descending: descending, aria: headers[col].getAttribute("aria-sort"),
                         link: link ? link.getAttribute("href") : null});
})()
"""
MODEL_FACTS = """
JSON.stringify({title: document.title, svgs: document.querySelectorAll("svg.plot").length,
                hits: document.querySelectorAll(".example figure.hit").length,
                misses: document.querySelectorAll(".example figure.miss").length,
                images: document.querySelectorAll(".example img").length})
"""


def main(site: str, screenshot: str) -> int:
    app = QApplication(sys.argv[:1])
    view = QWebEngineView()
    view.resize(1400, 1000)
    report: dict = {}

    def finish(code: int = 0) -> None:
        print(json.dumps(report), flush=True)
        app.exit(code)

    def on_model_facts(result) -> None:
        report["model"] = json.loads(result)
        report["url"] = view.url().toString()
        QTimer.singleShot(300, lambda: (report.__setitem__("screenshot", view.grab().save(screenshot)), finish()))

    def on_sorted(result) -> None:
        report["index"] = json.loads(result)
        link = report["index"]["link"]
        if not link:
            return finish(1)
        view.loadFinished.disconnect()
        view.loadFinished.connect(lambda ok: view.page().runJavaScript(MODEL_FACTS, 0, on_model_facts))
        # Follow the link as a user would: a click on the anchor.
        view.page().runJavaScript("document.querySelector(\"table.board a[href^='models/']\").click()", 0, lambda _: None)

    view.loadFinished.connect(lambda ok: view.page().runJavaScript(SORT_TWICE, 0, on_sorted))
    view.load(QUrl.fromLocalFile(os.path.abspath(os.path.join(site, "index.html"))))
    view.show()
    QTimer.singleShot(60_000, lambda: finish(2))  # never hang a test run
    return app.exec()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
