//! What every job shows next to its results: the score it optimised and each
//! held-out verifier, before and after (filter: all vs kept; inpaint:
//! original vs chosen; guide: unguided vs guided), as means over the run.
//! One builder for the summaries, `--json` and `report.html` of every job.
use super::{raw_value, type_of, RawScores, ScoreSpec};
use serde::Serialize;

/// One row: the spec's value, or one raw score of a verifier.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ComparisonRow {
    /// `optimised` (the spec, normalised) or `held-out` (a verifier's raw score).
    pub role: String,
    /// The spec's text, or `VERIFIER:SCORE` (`VERIFIER` for a single-score type).
    pub name: String,
    /// Means over the images with a finite value; `None` when there is none.
    pub before: Option<f64>,
    pub after: Option<f64>,
    /// How many images each mean is over.
    pub n_before: usize,
    pub n_after: usize,
}

impl ComparisonRow {
    pub fn change(&self) -> Option<f64> {
        Some(self.after? - self.before?)
    }
}

/// The optimised score and every verifier, before and after.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Comparison {
    /// What "before" is in this job: `all`, `original`, `unguided`.
    pub before: String,
    /// What "after" is: `kept`, `chosen`, `guided`.
    pub after: String,
    pub rows: Vec<ComparisonRow>,
}

fn mean(values: impl Iterator<Item = f64>) -> (Option<f64>, usize) {
    let v: Vec<f64> = values.filter(|x| x.is_finite()).collect();
    let n = v.len();
    ((n > 0).then(|| v.iter().sum::<f64>() / n as f64), n)
}

impl Comparison {
    /// Means of `spec`'s value and of every score of every verifier over the
    /// `before` and `after` images' raw scores.
    pub fn build(
        spec: &ScoreSpec,
        verify: &[String],
        before_label: &str,
        after_label: &str,
        before: &[&RawScores],
        after: &[&RawScores],
    ) -> Comparison {
        let row = |role: &str, name: String, f: &dyn Fn(&RawScores) -> f64| {
            let (b, nb) = mean(before.iter().map(|r| f(r)));
            let (a, na) = mean(after.iter().map(|r| f(r)));
            ComparisonRow { role: role.into(), name, before: b, after: a, n_before: nb, n_after: na }
        };
        let mut rows = vec![row("optimised", spec.to_string(), &|r| spec.value(r))];
        for v in verify {
            let Ok(info) = type_of(v) else { continue };
            for s in info.scores {
                let name = if info.single() { v.clone() } else { format!("{v}:{}", s.name) };
                rows.push(row("held-out", name, &|r| raw_value(r, v, s.name)));
            }
        }
        Comparison { before: before_label.into(), after: after_label.into(), rows }
    }

    /// One line per row for the text summary.
    pub fn lines(&self) -> Vec<String> {
        let fmt = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.4}"));
        self.rows
            .iter()
            .map(|r| {
                let what = if r.role == "optimised" { "optimised score" } else { "held-out verifier" };
                format!(
                    "{what} {}: {} {} -> {} {} (change {})",
                    r.name,
                    self.before,
                    fmt(r.before),
                    self.after,
                    fmt(r.after),
                    r.change().map_or("n/a".to_string(), |c| format!("{c:+.4}"))
                )
            })
            .collect()
    }

    pub fn figures(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("comparisons serialise")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(p: f64, b: Option<f64>) -> RawScores {
        let mut r = RawScores::new();
        r.entry("rahf".into()).or_default().insert("plausibility".into(), Some(p));
        r.entry("rahf.b".into()).or_default().insert("overall".into(), b);
        r
    }

    #[test]
    fn means_of_the_spec_and_of_each_verifier_score() {
        let spec: ScoreSpec = "plausibility".parse().unwrap();
        let all = [raw(0.1, Some(0.5)), raw(0.3, None), raw(0.5, Some(0.7))];
        let kept = [&all[2]];
        let c = Comparison::build(&spec, &["rahf.b".into()], "all", "kept", &all.iter().collect::<Vec<_>>(), &kept);
        assert_eq!(c.rows.len(), 5, "the spec and rahf.b's four scores");
        assert_eq!(c.rows[0].name, "rahf:plausibility");
        assert!((c.rows[0].before.unwrap() - 0.3).abs() < 1e-12);
        assert_eq!((c.rows[0].after, c.rows[0].n_before, c.rows[0].n_after), (Some(0.5), 3, 1));
        let overall = c.rows.iter().find(|r| r.name == "rahf.b:overall").unwrap();
        assert_eq!(overall.role, "held-out");
        assert!((overall.before.unwrap() - 0.6).abs() < 1e-12, "None is left out of the mean");
        assert_eq!((overall.after, overall.n_before), (Some(0.7), 2));
        let missing = c.rows.iter().find(|r| r.name == "rahf.b:alignment").unwrap();
        assert_eq!((missing.before, missing.after, missing.change()), (None, None, None));
        let lines = c.lines();
        assert_eq!(lines[0], "optimised score rahf:plausibility: all 0.3000 -> kept 0.5000 (change +0.2000)");
        assert!(lines[1].starts_with("held-out verifier rahf.b:plausibility: all n/a"), "{}", lines[1]);
        assert_eq!(c.figures()["rows"][0]["after"], 0.5);
    }
}
