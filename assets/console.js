// sealgate console: draws the overview's charts (Apache ECharts, served from the console
// itself) and adds new alerts as the server announces them (server-sent events).
// Text from records is only ever set with textContent, never parsed as HTML.
(function () {
  "use strict";

  function drawCharts() {
    var holder = document.getElementById("chart-data");
    if (!holder || typeof echarts === "undefined") return;
    var data = JSON.parse(holder.textContent);
    var stampsEl = document.getElementById("chart-stamps");
    if (stampsEl) {
      var days = [], seals = [];
      data.stamps.forEach(function (r) {
        if (days.indexOf(r[0]) < 0) days.push(r[0]);
        if (seals.indexOf(r[1]) < 0) seals.push(r[1]);
      });
      days.sort();
      var series = seals.map(function (seal) {
        return {
          name: seal, type: "bar", stack: "stamps",
          data: days.map(function (d) {
            var hit = data.stamps.filter(function (r) { return r[0] === d && r[1] === seal; });
            return hit.length ? hit[0][2] : 0;
          })
        };
      });
      var c = echarts.init(stampsEl, null, { renderer: "canvas" });
      c.setOption({
        animation: false,
        tooltip: { trigger: "axis" },
        legend: { data: seals },
        xAxis: { type: "category", data: days },
        yAxis: { type: "value", minInterval: 1 },
        series: series
      });
      stampsEl.setAttribute("data-drawn", String(series.length));
    }
    var refusalsEl = document.getElementById("chart-refusals");
    if (refusalsEl) {
      var r = echarts.init(refusalsEl, null, { renderer: "canvas" });
      r.setOption({
        animation: false,
        tooltip: {},
        xAxis: { type: "value", minInterval: 1 },
        grid: { containLabel: true, left: 10 },
        yAxis: { type: "category", data: data.refusals.map(function (x) { return x[0]; }) },
        series: [{ type: "bar", color: "#b22222", data: data.refusals.map(function (x) { return x[1]; }) }]
      });
      refusalsEl.setAttribute("data-drawn", String(data.refusals.length));
    }
  }

  function cell(text) {
    var td = document.createElement("td");
    td.textContent = text;
    return td;
  }

  function follow() {
    var counter = document.getElementById("open-alerts");
    var table = document.querySelector("#alerts tbody");
    if (!counter && !table) return;
    var source = new EventSource("/events");
    source.addEventListener("alert", function (e) {
      var a = JSON.parse(e.data);
      if (counter) counter.textContent = String(Number(counter.textContent) + 1);
      if (table && !document.getElementById("alert-" + a.seq)) {
        var tr = document.createElement("tr");
        tr.id = "alert-" + a.seq;
        tr.className = "new";
        var link = document.createElement("a");
        link.href = "/record/" + encodeURIComponent(a.site) + "/" + a.seq;
        link.textContent = String(a.seq);
        var first = document.createElement("td");
        first.appendChild(link);
        tr.appendChild(first);
        tr.appendChild(cell(a.at));
        var rule = cell(a.rule);
        rule.className = "rule";
        tr.appendChild(rule);
        tr.appendChild(cell(a.seal));
        tr.appendChild(cell(a.detail));
        tr.appendChild(cell(""));
        tr.appendChild(cell(""));
        table.insertBefore(tr, table.firstChild);
      }
    });
  }

  drawCharts();
  follow();
})();
