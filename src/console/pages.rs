//! The console's pages as HTML (maud: escaped by default, checked when compiled), in Chinese
//! (the default) or English.
//!
//! Owns: markup and the words on it. Never: reads data or decides who may see what (that is
//! [`super::web`]'s), or puts a record's text into the page unescaped.

use super::data::{AlertRow, Overview, RecordPage, SiteRecord, SiteState, SiteStatus};
use crate::audit::Record;
use crate::notify::{Delivery, Pending};
use maud::{html, Markup, PreEscaped, DOCTYPE};

/// The page language: zh-CN unless the auditor chose English.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    Zh,
    En,
}

/// (key, 中文, English)
const WORDS: &[(&str, &str, &str)] = &[
    ("title", "印章审计控制台", "Seal audit console"),
    ("overview", "概览", "Overview"),
    ("sites", "站点", "Sites"),
    ("search", "查询", "Search"),
    ("alerts", "告警", "Alerts"),
    ("logout", "退出", "Log out"),
    ("login", "登录", "Log in"),
    ("user", "用户名", "User name"),
    ("password", "密码", "Password"),
    ("code", "动态验证码", "TOTP code"),
    (
        "login_failed",
        "用户名、密码或验证码错误",
        "Wrong name, password or code",
    ),
    (
        "locked",
        "失败次数过多，请稍后再试",
        "Too many failures; try again later",
    ),
    (
        "unrecorded",
        "无法写入审计记录，操作未执行",
        "The audit record could not be made; nothing was done",
    ),
    ("period", "统计区间", "Period"),
    ("days", "天", "days"),
    ("since", "起始", "Since"),
    ("until", "截止", "Until"),
    ("stamps", "用印", "Stamps"),
    ("refusals", "拒绝", "Refusals"),
    ("open_alerts", "未处理告警", "Open alerts"),
    ("previous", "上一周期", "previous period"),
    (
        "stamps_per_day",
        "每日用印（按印章）",
        "Stamps per day, by seal",
    ),
    ("refusals_by_reason", "拒绝原因", "Refusals by reason"),
    ("stamps_per_seal", "各印章用印数", "Stamps per seal"),
    ("alerts_by_rule", "告警（按规则）", "Alerts by rule"),
    ("top_applicants", "申请人排行", "Top applicants"),
    ("failed", "用印失败", "Failed stamps"),
    ("unknown", "结果未知", "Outcomes unknown"),
    ("seal", "印章", "Seal"),
    ("site", "站点", "Site"),
    ("applicant", "申请人", "Applicant"),
    ("approver", "审批人", "Approver"),
    ("doc_type", "文件类型", "Document type"),
    ("doc", "文件摘要 (SHA-256)", "Document digest (SHA-256)"),
    ("reason", "原因", "Reason"),
    ("kind", "记录类型", "Kind"),
    ("time", "时间", "Time"),
    ("amount", "金额", "Amount"),
    ("count", "数量", "Count"),
    ("rule", "规则", "Rule"),
    ("detail", "详情", "Detail"),
    ("state", "状态", "State"),
    ("active", "在线", "Active"),
    ("silent", "静默", "Silent"),
    ("never", "从未连接", "Never connected"),
    ("head", "日志头", "Head"),
    ("last_record", "最新记录", "Last record"),
    ("checkpoint", "设备签名检查点", "Device-signed checkpoint"),
    ("uncovered", "未签名记录", "Records not yet signed"),
    ("results", "结果", "Results"),
    ("next_page", "下一页", "Next page"),
    ("export", "导出", "Export"),
    ("no_results", "没有符合条件的记录", "No record matches"),
    ("record", "审计记录", "Audit record"),
    ("approvers", "审批人", "Approvers"),
    ("level", "级别", "Level"),
    ("role", "角色", "Role"),
    ("approved_at", "审批时间", "Approved at"),
    ("evidence", "设备证据", "Device evidence"),
    ("device", "设备", "Device"),
    ("caller", "调用方", "Caller"),
    ("purpose", "用途", "Purpose"),
    ("dept", "部门", "Department"),
    ("approval", "审批令牌", "Approval"),
    ("related", "相关记录", "Related records"),
    ("refers_to", "所指记录", "Refers to"),
    ("referred_by", "引用此记录", "Referred to by"),
    ("chain", "哈希链", "Hash chain"),
    ("prev_hash", "前一哈希", "Previous hash"),
    ("hash", "哈希", "Hash"),
    ("previous_record", "上一条", "Previous record"),
    ("next_record", "下一条", "Next record"),
    ("covered_by", "覆盖此记录的检查点", "Covered by checkpoint"),
    (
        "not_covered",
        "尚无设备签名的检查点覆盖此记录",
        "No device-signed checkpoint covers it yet",
    ),
    ("check_yourself", "自行核验", "Check it yourself"),
    ("acknowledge", "确认", "Acknowledge"),
    ("comment", "备注", "Comment"),
    ("acknowledged", "已确认", "Acknowledged"),
    ("open", "未处理", "Open"),
    ("only_open", "只看未处理", "Open only"),
    ("all", "全部", "All"),
    ("by", "确认人", "By"),
    ("forbidden", "无权查看", "Not yours to see"),
    ("not_found", "没有这条记录", "No such record"),
    ("live", "实时", "Live"),
    ("as_of", "数据时间", "Figures as of"),
    ("lag", "未核验记录", "Records not yet verified"),
    ("per_site", "各站点", "By site"),
    ("last_seen", "最近联络", "Last heard from"),
    ("central_alerts", "总部告警", "Central alerts"),
    ("deliveries", "告警推送", "Deliveries"),
    ("channel", "渠道", "Channel"),
    ("delivered", "已送达", "Delivered"),
    ("waiting", "等待中", "Waiting"),
    ("failing", "失败重试中", "Failing, retried"),
    ("attempts", "尝试次数", "Attempts"),
    ("last_error", "最近错误", "Last error"),
    ("next_try", "下次尝试", "Next try"),
    ("digest_until", "汇总发送于", "Digest sent at"),
    (
        "no_outbox",
        "未配置告警推送（console.toml 的 outbox）",
        "No alert delivery configured (outbox in console.toml)",
    ),
    ("alert", "告警", "Alert"),
];

impl Lang {
    pub fn t(self, key: &str) -> &'static str {
        WORDS
            .iter()
            .find(|w| w.0 == key)
            .map(|w| if self == Lang::Zh { w.1 } else { w.2 })
            .unwrap_or("?")
    }

    fn tag(self) -> &'static str {
        match self {
            Lang::Zh => "zh-CN",
            Lang::En => "en",
        }
    }
}

pub use crate::audit::rfc3339 as time;

fn amount(r: &Record) -> String {
    r.amount
        .map(|a| minor_units(a, &r.currency))
        .unwrap_or_default()
}

/// An amount in minor units (fen, cents) as "1234.50 CNY".
pub fn minor_units(value: i64, currency: &str) -> String {
    format!(
        "{}{}.{:02} {currency}",
        if value < 0 { "-" } else { "" },
        value.unsigned_abs() / 100,
        value.unsigned_abs() % 100,
    )
}

/// What every page shares: the navigation, the user, the language switch and log-out.
pub struct Frame<'a> {
    pub lang: Lang,
    pub site: &'a str,
    pub user: Option<&'a str>,
    pub csrf: &'a str,
    pub here: &'a str,
}

fn page(f: &Frame, title: &str, body: Markup) -> Markup {
    let l = f.lang;
    html! {
        (DOCTYPE)
        html lang=(l.tag()) {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · " (l.t("title")) }
                link rel="stylesheet" href="/assets/console.css";
            }
            body {
                header {
                    strong { (l.t("title")) }
                    span.site { (f.site) }
                    @if let Some(user) = f.user {
                        nav {
                            a href="/" class=[(f.here == "overview").then_some("here")] { (l.t("overview")) }
                            a href="/sites" class=[(f.here == "sites").then_some("here")] { (l.t("sites")) }
                            a href="/search" class=[(f.here == "search").then_some("here")] { (l.t("search")) }
                            a href="/alerts" class=[(f.here == "alerts").then_some("here")] { (l.t("alerts")) }
                            a href="/deliveries" class=[(f.here == "deliveries").then_some("here")] { (l.t("deliveries")) }
                        }
                        span.user { (user) }
                        form.inline method="post" action="/logout" {
                            input type="hidden" name="csrf" value=(f.csrf);
                            button type="submit" id="logout" { (l.t("logout")) }
                        }
                    }
                    span.lang {
                        a href="?lang=zh" { "中文" } " | " a href="?lang=en" { "English" }
                    }
                }
                main { (body) }
                script src="/assets/echarts.min.js" {}
                script src="/assets/console.js" {}
            }
        }
    }
}

pub fn login(lang: Lang, site: &str, message: Option<&str>) -> Markup {
    let f = Frame {
        lang,
        site,
        user: None,
        csrf: "",
        here: "login",
    };
    page(
        &f,
        lang.t("login"),
        html! {
            form.login method="post" action="/login" {
                h1 { (lang.t("login")) }
                @if let Some(m) = message { p.error id="login-error" { (m) } }
                label { (lang.t("user")) input name="user" id="user" autocomplete="username" required; }
                label { (lang.t("password")) input name="password" id="password" type="password" autocomplete="current-password" required; }
                label { (lang.t("code")) input name="code" id="code" inputmode="numeric" autocomplete="one-time-code" pattern="[0-9]{6}" required; }
                button type="submit" id="login" { (lang.t("login")) }
            }
        },
    )
}

pub fn message(f: &Frame, title: &str, text: &str) -> Markup {
    page(f, title, html! { h1 { (title) } p.error { (text) } })
}

fn change(now: u64, before: u64) -> String {
    if before == 0 {
        return String::new();
    }
    let pct = (now as f64 - before as f64) * 100.0 / before as f64;
    format!("{pct:+.0} %")
}

/// The overview: period statistics (the figures of `sealctl audit stats --since`), charts,
/// the comparison with the period before, and open alerts.
pub fn overview(f: &Frame, days: u32, since_ms: i64, made_ms: i64, o: &Overview) -> Markup {
    let l = f.lang;
    let s = &o.stats;
    let mut per_seal: Vec<(String, u64)> = Vec::new();
    for (_, seal, n) in &s.stamps_per_seal_per_day {
        match per_seal.iter_mut().find(|(x, _)| x == seal) {
            Some(e) => e.1 += n,
            None => per_seal.push((seal.clone(), *n)),
        }
    }
    let chart = serde_json::json!({
        "stamps": s.stamps_per_seal_per_day,
        "refusals": s.denials_by_reason,
    });
    let card = |key: &str, id: &str, now: u64, before: u64| {
        html! {
            div.card {
                div.label { (l.t(key)) }
                div.figure id=(id) { (now) }
                div.small { (l.t("previous")) ": " span id={(id) "-before"} { (before) } " " (change(now, before)) }
            }
        }
    };
    page(
        f,
        l.t("overview"),
        html! {
            h1 { (l.t("overview")) }
            p.period {
                (l.t("period")) ": "
                @for d in [7u32, 30, 90, 365] {
                    a href={"/?days=" (d)} class=[(d == days).then_some("here")] { (d) " " (l.t("days")) } " "
                }
                " · " (l.t("since")) " " time id="since" datetime=(time(since_ms)) { (time(since_ms)) }
                " · " (l.t("as_of")) " " time id="made" datetime=(time(made_ms)) { (time(made_ms)) }
            }
            div.cards {
                (card("stamps", "stamps", o.now.stamps, o.before.stamps))
                (card("refusals", "refusals", o.now.refusals, o.before.refusals))
                (card("alerts", "alerts-count", o.now.alerts, o.before.alerts))
                div.card {
                    div.label { (l.t("open_alerts")) }
                    div.figure { a href="/alerts?open=1" id="open-alerts" { (o.open_alerts) } }
                    div.small { (l.t("live")) " ●" }
                }
            }
            script type="application/json" id="chart-data" { (PreEscaped(json_for_script(&chart))) }
            div.charts {
                section { h2 { (l.t("stamps_per_day")) } div.chart id="chart-stamps" {} }
                section { h2 { (l.t("refusals_by_reason")) } div.chart id="chart-refusals" {} }
            }
            @if !o.per_site.is_empty() {
                section {
                    h2 { (l.t("per_site")) }
                    table id="per-site" {
                        tr { th { (l.t("site")) } th { (l.t("stamps")) } th { (l.t("refusals")) } th { (l.t("alerts")) } }
                        @for (site, c) in &o.per_site {
                            tr { td { a href={"/search?site=" (percent(site))} { (site) } } td.n { (c.stamps) } td.n { (c.refusals) } td.n { (c.alerts) } }
                        }
                    }
                }
            }
            div.tables {
                section {
                    h2 { (l.t("stamps_per_seal")) }
                    table id="stamps-per-seal" {
                        tr { th { (l.t("seal")) } th { (l.t("count")) } }
                        @for (seal, n) in &per_seal { tr { td { (seal) } td.n { (n) } } }
                    }
                }
                section {
                    h2 { (l.t("refusals_by_reason")) }
                    table id="refusals-by-reason" {
                        tr { th { (l.t("reason")) } th { (l.t("count")) } }
                        @for (r, n) in &s.denials_by_reason { tr { td { (r) } td.n { (n) } } }
                    }
                }
                section {
                    h2 { (l.t("alerts_by_rule")) }
                    table id="alerts-by-rule" {
                        tr { th { (l.t("rule")) } th { (l.t("count")) } }
                        @for (r, n) in &s.alerts_by_rule { tr { td { (r) } td.n { (n) } } }
                    }
                }
                section {
                    h2 { (l.t("top_applicants")) }
                    table id="top-applicants" {
                        tr { th { (l.t("applicant")) } th { (l.t("count")) } }
                        @for (a, n) in &s.top_applicants { tr { td { (a) } td.n { (n) } } }
                    }
                    p { (l.t("failed")) ": " span id="failed" { (s.failed) } " · " (l.t("unknown")) ": " span id="outcomes-unknown" { (s.outcomes_unknown) } }
                }
            }
        },
    )
}

/// JSON inside a `<script>` element: `<` escaped so no text in it can close the element.
fn json_for_script(v: &serde_json::Value) -> String {
    v.to_string().replace('<', "\\u003c")
}

pub fn sites(f: &Frame, sites: &[SiteStatus]) -> Markup {
    let l = f.lang;
    let state = |s: SiteState| match s {
        SiteState::Active => ("active", l.t("active")),
        SiteState::Silent => ("silent", l.t("silent")),
        SiteState::Never => ("never", l.t("never")),
    };
    page(
        f,
        l.t("sites"),
        html! {
            h1 { (l.t("sites")) }
            @let central = sites.iter().any(|s| s.lag.is_some());
            table id="sites" {
                tr {
                    th { (l.t("site")) } th { (l.t("state")) } th { (l.t("head")) } th { (l.t("last_record")) }
                    @if central {
                        th { (l.t("lag")) } th { (l.t("last_seen")) } th { (l.t("central_alerts")) }
                    } @else {
                        th { (l.t("checkpoint")) } th { (l.t("uncovered")) }
                    }
                }
                @for s in sites {
                    @let (class, word) = state(s.state);
                    tr id={"site-" (s.site)} {
                        td { a href={"/search?site=" (percent(&s.site))} { (s.site) } }
                        td { span class={"state " (class)} { (word) } }
                        td.n { (s.head_seq) }
                        td { @if let Some(t) = s.head_at_ms { (time(t)) } }
                        @if central {
                            td.n.lag { (s.lag.unwrap_or(0)) }
                            td { @if let Some(t) = s.last_seen_ms { (time(t)) } }
                            td.flags {
                                @for (kind, n) in &s.flags { span.flag { (kind) " ×" (n) } " " }
                            }
                        } @else {
                            td { (s.checkpoint_seq) @if let Some(t) = s.checkpoint_at_ms { " · " (time(t)) } }
                            td.n { (s.uncovered) }
                        }
                    }
                }
            }
        },
    )
}

/// The search form's fields, as the query string carries them.
#[derive(Debug, Default, Clone, serde::Deserialize, serde::Serialize)]
#[serde(default)]
pub struct SearchForm {
    pub since: String,
    pub until: String,
    pub site: String,
    pub seal: String,
    pub applicant: String,
    pub approver: String,
    pub doc_type: String,
    pub doc: String,
    pub reason: String,
    pub kind: String,
    /// Where the page goes on from (the position of the last record of the one before).
    pub before: Option<String>,
}

impl SearchForm {
    /// The query string of this search (without paging), for links.
    pub fn query(&self) -> String {
        let mut q = self.clone();
        q.before = None;
        serde_urlencoded_pairs(&q)
    }
}

fn serde_urlencoded_pairs(q: &SearchForm) -> String {
    let pairs = [
        ("since", &q.since),
        ("until", &q.until),
        ("site", &q.site),
        ("seal", &q.seal),
        ("applicant", &q.applicant),
        ("approver", &q.approver),
        ("doc_type", &q.doc_type),
        ("doc", &q.doc),
        ("reason", &q.reason),
        ("kind", &q.kind),
    ];
    pairs
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}={}", percent(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// `s` percent-encoded for a URL's path or query (everything but unreserved characters).
pub fn percent(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub fn search(
    f: &Frame,
    form: &SearchForm,
    rows: &[SiteRecord],
    next: Option<String>,
    error: Option<&str>,
) -> Markup {
    let l = f.lang;
    let field = |key: &str, name: &str, value: &str, hint: &str| {
        html! { label { (l.t(key)) input name=(name) id={"f-" (name)} value=(value) placeholder=(hint); } }
    };
    let q = form.query();
    page(
        f,
        l.t("search"),
        html! {
            h1 { (l.t("search")) }
            form.search method="get" action="/search" {
                (field("site", "site", &form.site, ""))
                (field("since", "since", &form.since, "2026-12-01"))
                (field("until", "until", &form.until, "2026-12-31"))
                (field("seal", "seal", &form.seal, ""))
                (field("applicant", "applicant", &form.applicant, ""))
                (field("approver", "approver", &form.approver, ""))
                (field("doc_type", "doc_type", &form.doc_type, "contract"))
                (field("doc", "doc", &form.doc, "sha256"))
                (field("reason", "reason", &form.reason, ""))
                (field("kind", "kind", &form.kind, "stamp.completed"))
                button type="submit" id="search" { (l.t("search")) }
            }
            @if let Some(e) = error { p.error id="search-error" { (e) } }
            p {
                (l.t("export")) ": "
                a id="export-csv" href={"/export?format=csv&" (q)} { "CSV" } " · "
                a id="export-json" href={"/export?format=json&" (q)} { "JSON" }
            }
            @if rows.is_empty() {
                p id="no-results" { (l.t("no_results")) }
            } @else {
                table id="results" {
                    tr { th { "#" } th { (l.t("time")) } th { (l.t("kind")) } th { (l.t("seal")) } th { (l.t("applicant")) } th { (l.t("doc_type")) } th { (l.t("amount")) } th { (l.t("reason")) } }
                    @for r in rows {
                        tr {
                            td { a href={"/record/" (percent(&r.site)) "/" (r.record.seq)} { (r.record.seq) } }
                            td { (time(r.record.at_ms)) }
                            td { (r.record.kind) }
                            td { (r.record.seal) }
                            td { (r.record.applicant) }
                            td { (r.record.doc_type) }
                            td.n { (amount(&r.record)) }
                            td { (r.record.reason) }
                        }
                    }
                }
                @if let Some(b) = next {
                    p { a id="next-page" href={"/search?" (q) "&before=" (percent(&b))} { (l.t("next_page")) } }
                }
            }
        },
    )
}

#[derive(serde::Deserialize)]
struct ApproverEntry {
    #[serde(default)]
    id: String,
    #[serde(default)]
    role: String,
    #[serde(default)]
    level: serde_json::Value,
    #[serde(default)]
    approved_at: serde_json::Value,
}

fn record_link(site: &str, r: &Record) -> Markup {
    html! { a href={"/record/" (percent(site)) "/" (r.seq)} { "#" (r.seq) " " (r.kind) } " " (time(r.at_ms)) }
}

pub fn record(f: &Frame, p: &RecordPage, db_hint: &str, key_hint: &str) -> Markup {
    let l = f.lang;
    let r = &p.record;
    let approvers: Vec<ApproverEntry> = serde_json::from_str(&r.approvers).unwrap_or_default();
    let evidence = serde_json::from_str::<serde_json::Value>(&r.evidence)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| r.evidence.clone());
    let row = |key: &str, value: &str| {
        html! { @if !value.is_empty() { tr { th { (l.t(key)) } td { (value) } } } }
    };
    page(
        f,
        l.t("record"),
        html! {
            h1 { (l.t("record")) " #" (r.seq) " · " (r.kind) }
            table.record id="record" {
                (row("site", &p.site))
                (row("time", &time(r.at_ms)))
                (row("kind", &r.kind))
                (row("seal", &r.seal))
                (row("device", &[r.device.as_str(), r.device_profile.as_str(), r.device_serial.as_str()].iter().filter(|s| !s.is_empty()).cloned().collect::<Vec<_>>().join(" · ")))
                (row("caller", &r.caller))
                (row("applicant", &r.applicant))
                (row("approval", &r.jti))
                (row("doc", &r.doc_sha256))
                (row("doc_type", &r.doc_type))
                (row("amount", &amount(r)))
                (row("dept", &r.dept))
                (row("purpose", &r.purpose))
                (row("reason", &r.reason))
                (row("detail", &r.detail))
            }
            @if !approvers.is_empty() {
                h2 { (l.t("approvers")) }
                table id="approvers" {
                    tr { th { (l.t("level")) } th { (l.t("approver")) } th { (l.t("role")) } th { (l.t("approved_at")) } }
                    @for a in &approvers {
                        tr {
                            td { (a.level) }
                            td { (a.id) }
                            td { (a.role) }
                            td { @match a.approved_at.as_i64() { Some(t) => (time(t * 1000)), None => (a.approved_at) } }
                        }
                    }
                }
            }
            @if !r.evidence.is_empty() {
                h2 { (l.t("evidence")) }
                pre id="evidence" { (evidence) }
            }
            h2 { (l.t("related")) }
            ul id="related" {
                @if let Some(x) = &p.refers_to { li { (l.t("refers_to")) ": " (record_link(&p.site, x)) } }
                @for x in &p.referred_by { li { (l.t("referred_by")) ": " (record_link(&p.site, x)) @if !x.detail.is_empty() { " — " (x.detail) } } }
            }
            h2 { (l.t("chain")) }
            table id="chain" {
                tr { th { (l.t("prev_hash")) } td { code { (hex::encode(r.prev_hash)) } } }
                tr { th { (l.t("hash")) } td { code { (hex::encode(r.hash)) } } }
                @if let Some(x) = &p.prev { tr { th { (l.t("previous_record")) } td { (record_link(&p.site, x)) } } }
                @if let Some(x) = &p.next { tr { th { (l.t("next_record")) } td { (record_link(&p.site, x)) } } }
                tr {
                    th { (l.t("covered_by")) }
                    td id="checkpoint" {
                        @match &p.checkpoint {
                            Some(c) => { "#" (c.seq) " · " (time(c.at_ms)) " · " (c.algorithm) " · key " (c.key_id) }
                            None => (l.t("not_covered")),
                        }
                    }
                }
            }
            h2 { (l.t("check_yourself")) }
            pre id="commands" {
                "sealctl audit verify --db " (db_hint) " --key " (key_hint) "\n"
                "sealctl audit query --db " (db_hint) " --json"
                @if !r.doc_sha256.is_empty() { " --doc " (r.doc_sha256) }
                @if r.doc_sha256.is_empty() && !r.jti.is_empty() { " --kind " (r.kind) }
                "\n"
                "sqlite3 -readonly " (db_hint) " \"SELECT * FROM audit WHERE seq = " (r.seq) "\"\n"
            }
        },
    )
}

/// One delivery's state in a few words: delivered when, waiting until when, failing why.
fn delivery_state(l: Lang, d: &Delivery) -> Markup {
    html! {
        @match d.delivered_ms {
            Some(t) => span.state.active { (l.t("delivered")) " " (time(t)) },
            None if d.attempts == 0 => span.state.never {
                (l.t("waiting"))
                @if d.window_ms > 0 { " · " (l.t("digest_until")) " " (time(d.window_ms)) }
            },
            None => span.state.silent title=(d.last_error) {
                (l.t("failing")) " ×" (d.attempts) " · " (l.t("next_try")) " " (time(d.next_try_ms))
            },
        }
    }
}

pub fn deliveries(
    f: &Frame,
    configured: bool,
    pending: &Pending,
    rows: &[Delivery],
    next: Option<i64>,
) -> Markup {
    let l = f.lang;
    page(
        f,
        l.t("deliveries"),
        html! {
            h1 { (l.t("deliveries")) }
            @if !configured {
                p id="no-outbox" { (l.t("no_outbox")) }
            } @else {
                div.cards {
                    div.card { div.label { (l.t("delivered")) } div.figure id="delivered" { (pending.delivered) } }
                    div.card { div.label { (l.t("waiting")) } div.figure id="waiting" { (pending.waiting) } }
                    div.card { div.label { (l.t("failing")) } div.figure id="failing" { (pending.failing) } }
                }
                table id="deliveries" {
                    tr { th { (l.t("alert")) } th { (l.t("channel")) } th { (l.t("state")) } th { (l.t("attempts")) } th { (l.t("last_error")) } }
                    @for d in rows {
                        tr {
                            td { a href={"/record/" (percent(f.site)) "/" (d.alert_seq)} { (d.alert_seq) } }
                            td { (d.channel) }
                            td { (delivery_state(l, d)) }
                            td.n { (d.attempts) }
                            td { (d.last_error) }
                        }
                    }
                }
                @if let Some(b) = next {
                    p { a id="next-page" href={"/deliveries?before=" (b)} { (l.t("next_page")) } }
                }
            }
        },
    )
}

pub fn alerts(
    f: &Frame,
    rows: &[AlertRow],
    sent: &[Delivery],
    open_only: bool,
    next: Option<String>,
) -> Markup {
    let l = f.lang;
    page(
        f,
        l.t("alerts"),
        html! {
            h1 { (l.t("alerts")) " " span.small { (l.t("live")) " ●" } }
            p {
                a href="/alerts" class=[(!open_only).then_some("here")] { (l.t("all")) } " · "
                a href="/alerts?open=1" class=[open_only.then_some("here")] { (l.t("only_open")) }
            }
            table id="alerts" {
                thead { tr { th { "#" } th { (l.t("time")) } th { (l.t("rule")) } th { (l.t("seal")) } th { (l.t("detail")) } th { (l.t("deliveries")) } th { (l.t("state")) } } }
                tbody {
                    @for a in rows {
                        @let r = &a.alert.record;
                        tr id={"alert-" (r.seq)} {
                            td { a href={"/record/" (percent(&a.alert.site)) "/" (r.seq)} { (r.seq) } }
                            td { (time(r.at_ms)) }
                            td.rule { (r.reason) }
                            td { (r.seal) }
                            td { (r.detail) }
                            td.deliveries {
                                @for d in sent.iter().filter(|d| d.alert_seq == r.seq && a.alert.site == f.site) {
                                    div { (d.channel) ": " (delivery_state(l, d)) }
                                }
                            }
                            td {
                                @if a.acks.is_empty() {
                                    form.ack method="post" action={"/alerts/" (percent(&a.alert.site)) "/" (r.seq) "/ack"} {
                                        input type="hidden" name="csrf" value=(f.csrf);
                                        input name="comment" placeholder=(l.t("comment")) maxlength="500";
                                        button type="submit" { (l.t("acknowledge")) }
                                    }
                                } @else {
                                    @for k in &a.acks {
                                        div.acked { (l.t("acknowledged")) ": " (k.applicant) " · " (time(k.at_ms)) @if !k.detail.is_empty() { " — " (k.detail) } }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            @if let Some(b) = next {
                p { a id="next-page" href={"/alerts?before=" (percent(&b)) @if open_only { "&open=1" }} { (l.t("next_page")) } }
            }
        },
    )
}
