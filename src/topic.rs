//! Topic names and topic patterns. A name is 1–200 bytes of `A–Z a–z 0–9 _ - . : @ /`
//! (PRODUCT.md); a pattern is a name or a prefix ending in `*`. Pure functions only.

/// Longest topic name, in bytes.
pub const MAX_TOPIC_LEN: usize = 200;

fn is_topic_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'@' | b'/')
}

/// Why a topic name was refused; the text goes to the client as is.
pub fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("topic name is empty");
    }
    if name.len() > MAX_TOPIC_LEN {
        return Err("topic name is longer than 200 bytes");
    }
    if !name.bytes().all(is_topic_byte) {
        return Err("topic name may only contain A-Z a-z 0-9 _ - . : @ /");
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Exact(String),
    /// `news*` matches every topic starting with `news`; `*` alone matches all.
    Prefix(String),
}

/// A comma-separated list of patterns, as given to `--client-publish`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Patterns(Vec<Pattern>);

impl Patterns {
    pub fn parse(list: &str) -> Result<Patterns, String> {
        let mut out = Vec::new();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let pattern = match item.strip_suffix('*') {
                Some("") => Pattern::Prefix(String::new()),
                Some(prefix) => {
                    // A prefix may be shorter than a name but must use the same bytes.
                    if prefix.len() > MAX_TOPIC_LEN || !prefix.bytes().all(is_topic_byte) {
                        return Err(format!("{item:?} is not a topic prefix"));
                    }
                    Pattern::Prefix(prefix.to_string())
                }
                None => {
                    check_name(item).map_err(|e| format!("{item:?}: {e}"))?;
                    Pattern::Exact(item.to_string())
                }
            };
            out.push(pattern);
        }
        Ok(Patterns(out))
    }

    /// How many patterns (a cap on what a grant may accumulate).
    pub fn count(&self) -> usize {
        self.0.len()
    }

    /// Add one exact, already valid name (a topic the application allowed or refused).
    pub fn push_exact(&mut self, topic: &str) {
        self.0.push(Pattern::Exact(topic.to_string()));
    }

    /// The patterns as `parse` reads them (for a live upgrade).
    pub fn spelled(&self) -> String {
        let items: Vec<String> = self
            .0
            .iter()
            .map(|p| match p {
                Pattern::Exact(name) => name.clone(),
                Pattern::Prefix(prefix) => format!("{prefix}*"),
            })
            .collect();
        items.join(",")
    }

    pub fn matches(&self, topic: &str) -> bool {
        self.0.iter().any(|p| match p {
            Pattern::Exact(name) => name == topic,
            Pattern::Prefix(prefix) => topic.starts_with(prefix.as_str()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_alphabet_and_length() {
        assert!(check_name("news").is_ok());
        assert!(check_name("user:42/feed@eu-1.x_y").is_ok());
        assert!(check_name(&"a".repeat(200)).is_ok());
        assert!(check_name(&"a".repeat(201)).is_err());
        assert!(check_name("").is_err());
        assert!(check_name("has space").is_err());
        assert!(check_name("ünï").is_err());
        assert!(check_name("a*").is_err());
    }

    #[test]
    fn patterns_match_exact_names_and_prefixes() {
        let p = Patterns::parse("chat, user:*,").unwrap();
        assert!(p.matches("chat"));
        assert!(!p.matches("chatter"));
        assert!(p.matches("user:42"));
        assert!(p.matches("user:"));
        assert!(!p.matches("users"));
        assert!(Patterns::parse("*").unwrap().matches("anything"));
        assert!(!Patterns::default().matches("chat"));
        assert!(Patterns::parse("bad name").is_err());
        assert!(Patterns::parse("bad name*").is_err());
    }
}
