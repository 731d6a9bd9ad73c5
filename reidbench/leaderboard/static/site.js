// Sorting and filtering of the leaderboard tables; no dependencies, works from file://.
// Each cell carries its sort key in data-sort (numbers as text, empty when missing).
(function () {
  "use strict";

  function rowsOf(table) { return Array.prototype.slice.call(table.tBodies[0].rows); }

  function compare(a, b, numeric) {
    if (a === "" || b === "") { return (a === "") - (b === ""); }  // missing values last
    if (numeric) { return parseFloat(a) - parseFloat(b); }
    return a < b ? -1 : a > b ? 1 : 0;
  }

  function sortBy(table, header) {
    var col = Number(header.dataset.col);
    var descending = header.getAttribute("aria-sort") === "ascending";
    var rows = rowsOf(table);
    var numeric = rows.every(function (r) {
      var v = r.cells[col].dataset.sort;
      return v === "" || !isNaN(parseFloat(v));
    });
    rows.sort(function (x, y) {
      var a = x.cells[col].dataset.sort, b = y.cells[col].dataset.sort;
      var c = compare(a, b, numeric);
      return descending && a !== "" && b !== "" ? -c : c;
    });
    var body = table.tBodies[0];
    rows.forEach(function (r) { body.appendChild(r); });
    table.querySelectorAll("th.sortable").forEach(function (h) { h.removeAttribute("aria-sort"); });
    header.setAttribute("aria-sort", descending ? "descending" : "ascending");
  }

  // "text" matches as a case-insensitive substring; "<50", ">=20", "=0" compare numbers.
  function matches(cell, query) {
    var m = /^\s*(<=|>=|<|>|=)\s*(-?[0-9.]+)\s*$/.exec(query);
    if (m) {
      var v = parseFloat(cell.dataset.sort), x = parseFloat(m[2]);
      if (isNaN(v)) { return false; }
      return { "<": v < x, "<=": v <= x, ">": v > x, ">=": v >= x, "=": v === x }[m[1]];
    }
    return cell.textContent.toLowerCase().indexOf(query.toLowerCase()) !== -1;
  }

  function applyFilters(table) {
    var inputs = table.querySelectorAll("tr.filters input");
    rowsOf(table).forEach(function (row) {
      var shown = true;
      inputs.forEach(function (input) {
        if (input.value.trim() !== "" && !matches(row.cells[Number(input.dataset.col)], input.value.trim())) { shown = false; }
      });
      row.hidden = !shown;
    });
  }

  document.querySelectorAll("table.board").forEach(function (table) {
    table.querySelectorAll("th.sortable").forEach(function (header) {
      header.addEventListener("click", function () { sortBy(table, header); });
    });
    table.querySelectorAll("tr.filters input").forEach(function (input) {
      input.addEventListener("input", function () { applyFilters(table); });
    });
  });
}());
