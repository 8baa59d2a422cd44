//! Summary statistics of a figure's samples: the median is the figure, min and max
//! show how noisy the machine was while it was measured.

/// Median, minimum and maximum of a non-empty sample set.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Summary {
    /// `None` for an empty set. The median of an even count is the mean of the two
    /// middle values.
    pub fn of(samples: &[f64]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        let mut s = samples.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        let mid = s.len() / 2;
        let median = if s.len() % 2 == 1 { s[mid] } else { (s[mid - 1] + s[mid]) / 2.0 };
        Some(Self { median, min: s[0], max: s[s.len() - 1] })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(Summary::of(&[]), None);
        assert_eq!(Summary::of(&[3.0]), Some(Summary { median: 3.0, min: 3.0, max: 3.0 }));
        assert_eq!(Summary::of(&[5.0, 1.0, 4.0]), Some(Summary { median: 4.0, min: 1.0, max: 5.0 }));
        assert_eq!(Summary::of(&[4.0, 1.0, 3.0, 10.0]), Some(Summary { median: 3.5, min: 1.0, max: 10.0 }));
    }
}
