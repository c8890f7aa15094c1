//! The shipped Grafana dashboards (`dist/grafana/*.json`) as their PromQL queries, and the metric
//! names in a query and in a Prometheus scrape: what xdp-lb's and l7-sidecar's Grafana tests
//! compare (each against a real scrape of its own binary).

use std::{collections::BTreeSet, path::Path};

use anyhow::{ensure, Context};
use serde_json::Value;

/// One PromQL expression of a dashboard: a panel's `expr` or a template variable's `definition`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    pub file: String,
    /// The panel (or variable) title it belongs to.
    pub title: String,
    pub expr: String,
}

/// Every query of every `*.json` in `dir`.
pub fn queries(dir: &Path) -> anyhow::Result<Vec<Query>> {
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    ensure!(!files.is_empty(), "no Grafana dashboard (*.json) in {}", dir.display());
    for path in files {
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let dashboard: Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
        let file = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        walk(&dashboard, &file, "", &mut out);
    }
    Ok(out)
}

fn walk(v: &Value, file: &str, title: &str, out: &mut Vec<Query>) {
    match v {
        Value::Object(m) => {
            let title = m.get("title").and_then(Value::as_str).unwrap_or(title);
            // Panel queries, and the template variables' `label_values(...)` definitions.
            for key in ["expr", "definition"] {
                if let Some(expr) = m.get(key).and_then(Value::as_str) {
                    out.push(Query { file: file.to_string(), title: title.to_string(), expr: expr.to_string() });
                }
            }
            for v in m.values() {
                walk(v, file, title, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|v| walk(v, file, title, out)),
        _ => {}
    }
}

/// The metric names in a PromQL expression: identifiers with one of the binaries' prefixes
/// (`xdp_lb_`, `gateway_`).
pub fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut word = String::new();
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
        } else {
            if word.starts_with("xdp_lb_") || word.starts_with("gateway_") {
                names.push(std::mem::take(&mut word));
            }
            word.clear();
        }
    }
    names
}

/// The series names of a Prometheus text scrape (a histogram's `_bucket`, `_sum`, `_count`).
pub fn exported_names(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_names_are_found_in_promql() {
        assert_eq!(
            metric_names(r#"sum by (backend) (rate(xdp_lb_backend_packets_total{service=~"$service"}[$__rate_interval]))"#),
            ["xdp_lb_backend_packets_total"]
        );
        assert_eq!(
            metric_names("histogram_quantile(0.99, sum by (le) (rate(gateway_request_duration_seconds_bucket[5m]))) / xdp_lb_x"),
            ["gateway_request_duration_seconds_bucket", "xdp_lb_x"]
        );
    }

    #[test]
    fn a_scrape_names_its_series() {
        let scrape = "# TYPE gateway_requests_total counter\ngateway_requests_total{route=\"a\",status=\"200\"} 3\n\
                      gateway_request_duration_seconds_bucket{le=\"0.1\"} 1\nxdp_lb_backend_up 1\n\n";
        let names: Vec<String> = exported_names(scrape).into_iter().collect();
        assert_eq!(names, ["gateway_request_duration_seconds_bucket", "gateway_requests_total", "xdp_lb_backend_up"]);
    }

    #[test]
    fn every_shipped_dashboard_is_read() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/grafana");
        let q = queries(&dir).unwrap();
        assert!(q.len() >= 10 && q.iter().all(|q| q.file.ends_with(".json") && !q.expr.is_empty()), "{q:?}");
        assert!(queries(Path::new("/nonexistent")).is_err());
    }
}
