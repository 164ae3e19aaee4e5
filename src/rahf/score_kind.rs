//! Naming one of RAHF's four scores: what `filter` keeps by, what `guide`
//! guides on, in CLI flags and recipes alike.
use crate::error::{Error, Result};
use crate::rahf::config::SCORE_TYPES;
use crate::rahf::Scores;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ScoreKind {
    #[default]
    Plausibility,
    Alignment,
    Aesthetics,
    Overall,
}

impl ScoreKind {
    pub const ALL: [ScoreKind; 4] = [ScoreKind::Plausibility, ScoreKind::Alignment, ScoreKind::Aesthetics, ScoreKind::Overall];

    /// The column of RAHF's B x 4 scores (`SCORE_TYPES` order).
    pub fn index(self) -> usize {
        match self {
            ScoreKind::Plausibility => 0,
            ScoreKind::Alignment => 1,
            ScoreKind::Aesthetics => 2,
            ScoreKind::Overall => 3,
        }
    }

    /// The CLI / recipe name.
    pub fn name(self) -> &'static str {
        SCORE_TYPES[self.index()]
    }

    /// This score out of a [`Scores`].
    pub fn of(self, s: &Scores) -> f64 {
        match self {
            ScoreKind::Plausibility => s.plausibility,
            ScoreKind::Alignment => s.alignment,
            ScoreKind::Aesthetics => s.aesthetics,
            ScoreKind::Overall => s.overall,
        }
    }
}

impl std::fmt::Display for ScoreKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ScoreKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        ScoreKind::ALL.into_iter().find(|k| k.name() == s).ok_or_else(|| {
            Error::Invalid(format!("--score `{s}`: expected plausibility, alignment, aesthetics or overall"))
        })
    }
}
