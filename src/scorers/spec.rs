//! The score spec: what a job optimises, in flags (`--score`) and recipes
//! (`score:`), as one string.
//!
//! ```text
//! spec   = term ("+" term)*
//! term   = [weight "*"] scorer [":" score]
//! scorer = TYPE | TYPE "." LABEL          (an instance: `rahf`, `rahf.b`, `pickscore`)
//! ```
//!
//! * `pickscore`: a single-score scorer's one score;
//! * `rahf:plausibility`: a named score of a scorer with several;
//! * `0.7*rahf:plausibility+0.3*hpsv2`: a weighted sum of normalised scores.
//!   Weights are positive and sum to 1, so the value stays on the scale of the
//!   normalised scores (thresholds in [0, 1]).
//! * A bare RAHF score name (`plausibility`, `aesthetics`, ...) means
//!   `rahf:<name>`: what `--score` and `score:` meant before scorers were
//!   pluggable, so old flags and recipes keep working.
//!
//! The value of a spec for an image is `Σ weight · normalise(raw)`, each raw
//! score normalised by its scorer's fixed affine map ([`super::Affine`]).
use super::{raw_value, type_of, RawScores, ScorerInfo, Scorers};
use crate::error::{Error, Result};
use crate::rahf::ScoreKind;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tch::{Kind, Tensor};

/// One weighted score of a spec.
#[derive(Debug, Clone, PartialEq)]
pub struct Term {
    pub weight: f64,
    /// The scorer instance (`rahf`, `rahf.b`, `pickscore`).
    pub scorer: String,
    /// The score's name in its type ([`ScorerInfo::scores`]).
    pub score: &'static str,
}

impl Term {
    fn info(&self) -> &'static ScorerInfo {
        type_of(&self.scorer).expect("terms are parsed against the registry")
    }

    fn index(&self) -> usize {
        self.info().scores.iter().position(|s| s.name == self.score).expect("terms name a score of their type")
    }

    /// `scorer:score`, or `scorer` for a single-score type.
    pub fn name(&self) -> String {
        if self.info().single() {
            self.scorer.clone()
        } else {
            format!("{}:{}", self.scorer, self.score)
        }
    }

    /// This term's normalised score (unweighted) from raw scores; NaN when missing.
    pub fn normalized(&self, raw: &RawScores) -> f64 {
        let def = &self.info().scores[self.index()];
        def.normalization.apply(raw_value(raw, &self.scorer, self.score))
    }
}

/// A parsed score spec; see the module doc.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreSpec {
    terms: Vec<Term>,
}

impl From<ScoreKind> for ScoreSpec {
    fn from(k: ScoreKind) -> Self {
        ScoreSpec { terms: vec![Term { weight: 1.0, scorer: "rahf".into(), score: k.name() }] }
    }
}

impl ScoreSpec {
    pub fn terms(&self) -> &[Term] {
        &self.terms
    }

    /// The RAHF score this spec is, when it is exactly one of RAHF's four with
    /// weight 1 (what `--score plausibility` always meant).
    pub fn legacy(&self) -> Option<ScoreKind> {
        match self.terms.as_slice() {
            [t] if t.scorer == "rahf" && t.weight == 1.0 => t.score.parse().ok(),
            _ => None,
        }
    }

    /// How the spec is written into `settings.json`: a legacy spec as the bare
    /// RAHF score name (so runs made before specs existed resume), any other
    /// as its canonical text.
    pub fn fingerprint(&self) -> serde_json::Value {
        match self.legacy() {
            Some(k) => k.name().into(),
            None => self.to_string().into(),
        }
    }

    /// The scorer instances the spec reads, each once, in order of appearance.
    pub fn scorers(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for t in &self.terms {
            if !out.contains(&t.scorer) {
                out.push(t.scorer.clone());
            }
        }
        out
    }

    pub fn uses(&self, instance: &str) -> bool {
        self.terms.iter().any(|t| t.scorer == instance)
    }

    /// The spec's value for one image: Σ weight · normalised raw score. NaN
    /// when a score is missing or NaN (such an image is never kept or chosen).
    pub fn value(&self, raw: &RawScores) -> f64 {
        self.terms.iter().map(|t| t.weight * t.normalized(raw)).sum()
    }

    /// The differentiable value, a B float32 tensor, of `pixels` (B x 3 x H x
    /// W in [0, 1]) through every scorer's [`super::Scorer::scores_from_pixels`]
    /// (one call per instance). A single RAHF term with weight 1 is exactly
    /// that RAHF score: no operation is added.
    pub fn value_from_pixels(&self, scorers: &Scorers, pixels: &Tensor, prompts: &[String]) -> Result<Tensor> {
        let b = pixels.size().first().copied().unwrap_or(0);
        let mut total: Option<Tensor> = None;
        for name in self.scorers() {
            let scorer = scorers.require(&name)?;
            let info = scorer.info();
            let raw = scorer.scores_from_pixels(pixels, prompts)?;
            if raw.size() != [b, info.scores.len() as i64] {
                return Err(Error::Invalid(format!(
                    "scorer `{name}` gave differentiable scores of shape {:?} for {b} images (expected [{b}, {}])",
                    raw.size(),
                    info.scores.len()
                )));
            }
            for t in self.terms.iter().filter(|t| t.scorer == name) {
                let def = &info.scores[t.index()];
                let v = def.normalization.apply_tensor(&raw.select(1, t.index() as i64).to_kind(Kind::Float));
                let v = if t.weight == 1.0 { v } else { v * t.weight };
                total = Some(match total {
                    None => v,
                    Some(acc) => {
                        let v = v.to_device(acc.device());
                        acc + v
                    }
                });
            }
        }
        total.ok_or_else(|| Error::Invalid("an empty score spec has no value".into()))
    }

    /// Errors when a scorer of the spec has no checkpoint (`given` says
    /// which instances have one); `field` names where the spec is written.
    pub fn check_given(&self, field: &str, given: &dyn Fn(&str) -> bool) -> Result<()> {
        for name in self.scorers() {
            if !given(&name) {
                return Err(Error::field(field, format!("`{self}` uses scorer `{name}`, but {}", not_given(&name))));
            }
        }
        Ok(())
    }
}

/// How to give the checkpoint of instance `name`, for messages.
pub fn not_given(name: &str) -> String {
    let what = type_of(name).map(|i| i.checkpoint).unwrap_or("its checkpoint");
    if name == "rahf" {
        format!("no RAHF folder is given: set models.rahf (recipe) or --rahf to {what}")
    } else {
        format!("no checkpoint is given for it: set models.scorers.{name} (recipe) or --scorer-model {name}=PATH to {what}")
    }
}

impl std::fmt::Display for ScoreSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let [t] = self.terms.as_slice() {
            if t.weight == 1.0 {
                return f.write_str(&t.name());
            }
        }
        let parts: Vec<String> = self.terms.iter().map(|t| format!("{}*{}", t.weight, t.name())).collect();
        f.write_str(&parts.join("+"))
    }
}

/// The most terms a spec may have.
const MAX_TERMS: usize = 16;

impl std::str::FromStr for ScoreSpec {
    type Err = Error;

    fn from_str(text: &str) -> Result<ScoreSpec> {
        let bad = |msg: String| Error::Invalid(format!("score spec `{text}`: {msg}"));
        if text.trim().is_empty() {
            return Err(bad("empty; write e.g. `rahf:plausibility` or `0.7*rahf:plausibility+0.3*rahf.b:aesthetics`".into()));
        }
        let parts: Vec<&str> = text.split('+').collect();
        if parts.len() > MAX_TERMS {
            return Err(bad(format!("{} terms; at most {MAX_TERMS}", parts.len())));
        }
        let mut terms: Vec<Term> = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            let term = part.trim();
            if term.is_empty() {
                return Err(bad(format!("term {} is empty (a `+` with nothing on one side)", i + 1)));
            }
            let t = parse_term(term).map_err(|m| bad(format!("term `{term}`: {m}")))?;
            if let Some(prev) = terms.iter().find(|p| p.scorer == t.scorer && p.score == t.score) {
                return Err(bad(format!("term `{term}`: `{}` appears twice; give it one weight", prev.name())));
            }
            terms.push(t);
        }
        let sum: f64 = terms.iter().map(|t| t.weight).sum();
        if (sum - 1.0).abs() > 1e-6 {
            return Err(bad(format!(
                "the weights sum to {sum}, not 1 (scores are normalised so that a weighted mean stays on their [0, 1] scale)"
            )));
        }
        Ok(ScoreSpec { terms })
    }
}

/// One term, or the reason it is not one (without the spec's prefix).
fn parse_term(term: &str) -> std::result::Result<Term, String> {
    let (weight, rest) = match term.split_once('*') {
        Some((w, rest)) => {
            let w = w.trim();
            let weight: f64 = w.parse().map_err(|_| format!("weight `{w}` is not a number"))?;
            if !weight.is_finite() || weight <= 0.0 {
                return Err(format!("weight `{w}` must be a finite number > 0"));
            }
            (weight, rest.trim())
        }
        None => (1.0, term),
    };
    if rest.contains('*') {
        return Err("one `*` per term: `WEIGHT*SCORER[:SCORE]`".into());
    }
    if rest.is_empty() {
        return Err("no scorer after the weight".into());
    }
    let (name, score) = match rest.split_once(':') {
        Some((n, s)) => (n.trim(), Some(s.trim())),
        None => (rest, None),
    };
    let scores_of = |i: &ScorerInfo| i.score_names().join(", ");
    match score {
        Some(s) => {
            let info = type_of(name).map_err(|e| e.to_string())?;
            let def = info.score(s).ok_or_else(|| {
                format!("scorer `{name}` has no score `{s}`; its scores: {}", scores_of(info))
            })?;
            Ok(Term { weight, scorer: name.to_string(), score: def.name })
        }
        None => match type_of(name) {
            Ok(info) if info.single() => Ok(Term { weight, scorer: name.to_string(), score: info.scores[0].name }),
            Ok(info) => Err(format!(
                "scorer `{name}` has several scores; name one: {}",
                info.score_names().iter().map(|s| format!("{name}:{s}")).collect::<Vec<_>>().join(", ")
            )),
            // A bare RAHF score name: what the flag meant before scorers.
            Err(unknown) => match name.parse::<ScoreKind>() {
                Ok(k) => Ok(Term { weight, scorer: "rahf".into(), score: k.name() }),
                Err(_) => Err(format!(
                    "{unknown}; a bare name is a scorer or one of RAHF's scores ({})",
                    ScoreKind::ALL.map(|k| k.name()).join(", ")
                )),
            },
        },
    }
}

impl Serialize for ScoreSpec {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ScoreSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(|e: Error| serde::de::Error::custom(e.to_string()))
    }
}

/// `--verify a,b`: scorer instance names, comma-separated, each once.
pub fn parse_verify(text: &str) -> Result<Vec<String>> {
    let names: Vec<String> = text.split(',').map(|s| s.trim().to_string()).collect();
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    if names.iter().any(String::is_empty) {
        return Err(Error::Invalid(format!("--verify `{text}`: an empty name (a stray comma)")));
    }
    Ok(names)
}

/// Checks a job's verifiers against its spec: each a known scorer type,
/// each once, and none that drives the job (in `spec`). `field` names where
/// the list is written (`filter.verify`).
pub fn check_verify(field: &str, verify: &[String], spec: &ScoreSpec) -> Result<()> {
    for (i, v) in verify.iter().enumerate() {
        type_of(v).map_err(|e| Error::field(field, e.to_string()))?;
        if verify[..i].contains(v) {
            return Err(Error::field(field, format!("`{v}` is listed twice")));
        }
        if spec.uses(v) {
            return Err(Error::field(
                field,
                format!(
                    "`{v}` is in the score spec `{spec}`, so it drives the selection or gradient and is not held out; \
                     verify with another scorer (a second checkpoint of the same type is `{}.b`)",
                    type_of(v).map(|i| i.name).unwrap_or(v.as_str())
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn p(s: &str) -> ScoreSpec {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn err(s: &str) -> String {
        s.parse::<ScoreSpec>().unwrap_err().to_string()
    }

    #[test]
    fn legacy_names_mean_rahf_scores() {
        for k in ScoreKind::ALL {
            let s = p(k.name());
            assert_eq!(s, ScoreSpec::from(k));
            assert_eq!(s.legacy(), Some(k));
            assert_eq!(s.fingerprint(), serde_json::json!(k.name()));
            assert_eq!(s.to_string(), format!("rahf:{}", k.name()));
            assert_eq!(p(&format!("rahf:{}", k.name())), s);
        }
        // Another instance or a weight is no longer the legacy spec.
        assert_eq!(p("rahf.b:overall").legacy(), None);
        assert_eq!(p("rahf.b:overall").fingerprint(), serde_json::json!("rahf.b:overall"));
    }

    #[test]
    fn weighted_sums_parse_and_print_canonically() {
        let s = p(" 0.7 * rahf:plausibility + 0.3*rahf.b:aesthetics ");
        assert_eq!(s.terms().len(), 2);
        assert_eq!(s.terms()[0], Term { weight: 0.7, scorer: "rahf".into(), score: "plausibility" });
        assert_eq!(s.terms()[1], Term { weight: 0.3, scorer: "rahf.b".into(), score: "aesthetics" });
        assert_eq!(s.to_string(), "0.7*rahf:plausibility+0.3*rahf.b:aesthetics");
        assert_eq!(p(&s.to_string()), s);
        assert_eq!(s.scorers(), ["rahf", "rahf.b"]);
        assert_eq!(s.fingerprint(), serde_json::json!("0.7*rahf:plausibility+0.3*rahf.b:aesthetics"));
        // Legacy names inside a sum; three terms whose float sum is not exactly 1.
        let s = p("0.7*plausibility+0.2*rahf:overall+0.1*aesthetics");
        assert_eq!(s.scorers(), ["rahf"]);
        assert_eq!(s.terms()[2].score, "aesthetics");
    }

    #[test]
    fn bad_specs_name_the_offending_term() {
        for (spec, needles) in [
            ("", &["empty"][..]),
            ("  ", &["empty"]),
            ("beauty", &["`beauty`", "known scorers: rahf", "plausibility"]),
            ("0.5*rahf:plausibility+0.5*rahf:beauty", &["term `0.5*rahf:beauty`", "no score `beauty`", "aesthetics"]),
            ("rahf", &["several scores", "rahf:plausibility"]),
            ("rahf.b", &["several scores", "rahf.b:overall"]),
            ("0.5*rahf:plausibility+", &["term 2 is empty"]),
            ("x*rahf:overall", &["weight `x` is not a number"]),
            ("-1*rahf:overall+2*rahf:plausibility", &["term `-1*rahf:overall`", "> 0"]),
            ("0*rahf:overall+1*rahf:plausibility", &["term `0*rahf:overall`", "> 0"]),
            ("inf*rahf:overall", &["finite"]),
            ("0.5*0.5*rahf:overall", &["one `*` per term"]),
            ("0.5*", &["no scorer"]),
            ("0.7*rahf:plausibility+0.7*aesthetics", &["sum to 1.4", "not 1"]),
            ("0.5*rahf:overall", &["sum to 0.5"]),
            ("0.5*plausibility+0.5*rahf:plausibility", &["appears twice"]),
            ("pickscorr", &["unknown scorer `pickscorr`"]),
            ("0.5*rahf.:overall+0.5*rahf:overall", &["label"]),
        ] {
            let e = err(spec);
            assert!(e.contains(&format!("score spec `{spec}`")), "{spec}: {e}");
            for n in needles {
                assert!(e.contains(n), "{spec:?}: {e} lacks {n}");
            }
        }
        let many = vec!["0.0625*rahf:overall"; 17].join("+");
        assert!(err(&many).contains("at most 16"));
    }

    fn raw(entries: &[(&str, &str, Option<f64>)]) -> RawScores {
        let mut r: RawScores = BTreeMap::new();
        for (i, s, v) in entries {
            r.entry(i.to_string()).or_default().insert(s.to_string(), *v);
        }
        r
    }

    #[test]
    fn values_are_weighted_sums_of_normalised_scores() {
        let r = raw(&[("rahf", "plausibility", Some(0.2)), ("rahf.b", "aesthetics", Some(0.6))]);
        assert_eq!(p("plausibility").value(&r), 0.2);
        let v = p("0.7*rahf:plausibility+0.3*rahf.b:aesthetics").value(&r);
        assert!((v - (0.7 * 0.2 + 0.3 * 0.6)).abs() < 1e-15, "{v}");
        // A missing or NaN score makes the value NaN.
        assert!(p("rahf:overall").value(&r).is_nan());
        let r = raw(&[("rahf", "plausibility", None)]);
        assert!(p("plausibility").value(&r).is_nan());
    }

    #[test]
    fn serde_reads_and_writes_the_text() {
        let s: ScoreSpec = serde_json::from_str("\"0.25*rahf:overall+0.75*rahf.b:plausibility\"").unwrap();
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"0.25*rahf:overall+0.75*rahf.b:plausibility\"");
        let e = serde_json::from_str::<ScoreSpec>("\"beauty\"").unwrap_err().to_string();
        assert!(e.contains("beauty"), "{e}");
    }

    #[test]
    fn verifiers_are_held_out() {
        let spec = p("0.5*rahf:plausibility+0.5*rahf.c:overall");
        assert_eq!(parse_verify("rahf.b, rahf.d").unwrap(), ["rahf.b", "rahf.d"]);
        assert_eq!(parse_verify("").unwrap(), Vec::<String>::new());
        assert!(parse_verify("rahf.b,,rahf.d").unwrap_err().to_string().contains("stray comma"));
        check_verify("filter.verify", &["rahf.b".into()], &spec).unwrap();
        let e = check_verify("filter.verify", &["rahf.c".into()], &spec).unwrap_err().to_string();
        assert!(e.starts_with("filter.verify: `rahf.c` is in the score spec") && e.contains("not held out"), "{e}");
        let e = check_verify("guide.verify", &["rahf.b".into(), "rahf.b".into()], &spec).unwrap_err().to_string();
        assert!(e.contains("twice"), "{e}");
        let e = check_verify("guide.verify", &["hps".into()], &spec).unwrap_err().to_string();
        assert!(e.contains("unknown scorer `hps`") && e.contains("known scorers"), "{e}");
        let e = spec.check_given("filter.score", &|n| n == "rahf").unwrap_err().to_string();
        assert!(e.contains("rahf.c") && e.contains("--scorer-model rahf.c=PATH"), "{e}");
        let e = p("overall").check_given("guide.score", &|_| false).unwrap_err().to_string();
        assert!(e.contains("--rahf"), "{e}");
    }
}
