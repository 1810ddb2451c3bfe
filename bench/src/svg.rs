//! The chart: hand-written SVG, one panel of horizontal bars per latency or throughput
//! figure, the shim's bar highlighted against its baselines.

use std::fmt::Write as _;

use crate::report::Chart;

const WIDTH: f64 = 960.0;
const LABEL_W: f64 = 230.0;
const VALUE_W: f64 = 150.0;
const BAR_H: f64 = 20.0;
const GAP: f64 = 6.0;
const TITLE_H: f64 = 30.0;
const PANEL_GAP: f64 = 18.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Formats a value for a bar's label: three significant digits.
pub fn fmt_value(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Renders the panels as one SVG document.
pub fn render(title: &str, charts: &[Chart]) -> String {
    let height: f64 = 50.0
        + charts
            .iter()
            .map(|c| TITLE_H + c.bars.len() as f64 * (BAR_H + GAP) + PANEL_GAP)
            .sum::<f64>();
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="13">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="12" y="28" font-size="18" font-weight="bold">{}</text>"#,
        esc(title)
    );
    let mut y = 50.0;
    let bar_space = WIDTH - LABEL_W - VALUE_W - 24.0;
    for c in charts {
        let hint = if c.higher_is_better {
            "higher is better"
        } else {
            "lower is better"
        };
        let _ = writeln!(
            s,
            r##"<text x="12" y="{:.1}" font-weight="bold">{} <tspan font-weight="normal" fill="#666">({}, {hint})</tspan></text>"##,
            y + 18.0,
            esc(&c.title),
            esc(&c.unit)
        );
        y += TITLE_H;
        let max = c
            .bars
            .iter()
            .map(|b| b.value)
            .filter(|v| v.is_finite())
            .fold(0.0f64, f64::max);
        for (i, b) in c.bars.iter().enumerate() {
            let w = if max > 0.0 && b.value.is_finite() && b.value > 0.0 {
                (b.value / max * bar_space).max(1.0)
            } else {
                0.0
            };
            let fill = if i == 0 { "#d9480f" } else { "#868e96" };
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
                LABEL_W,
                y + BAR_H - 5.0,
                esc(&b.label)
            );
            let _ = writeln!(
                s,
                r#"<rect x="{:.1}" y="{y:.1}" width="{w:.1}" height="{BAR_H}" fill="{fill}"/>"#,
                LABEL_W + 8.0
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}">{} {}</text>"#,
                LABEL_W + 14.0 + w,
                y + BAR_H - 5.0,
                fmt_value(b.value),
                esc(&c.unit)
            );
            y += BAR_H + GAP;
        }
        y += PANEL_GAP;
    }
    let _ = writeln!(s, "</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{Bar, Chart};

    #[test]
    fn renders_one_bar_per_value_scaled_to_the_largest() {
        let chart = Chart {
            title: "signal <latency>".into(),
            unit: "µs".into(),
            higher_is_better: false,
            bars: vec![
                Bar {
                    label: "agent-shim".into(),
                    value: 10.0,
                },
                Bar {
                    label: "tini-static".into(),
                    value: 20.0,
                },
            ],
        };
        let svg = render("t", &[chart]);
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("signal &lt;latency&gt;"));
        assert_eq!(svg.matches("<rect x=").count(), 2);
        let full = format!("width=\"{:.1}\"", WIDTH - LABEL_W - VALUE_W - 24.0);
        let half = format!("width=\"{:.1}\"", (WIDTH - LABEL_W - VALUE_W - 24.0) / 2.0);
        assert!(svg.contains(&full), "{svg}");
        assert!(svg.contains(&half), "{svg}");
    }
}
