//! [`crate::named_enum!`]: an enum whose user-facing names (and accepted aliases) are written once, giving
//! `name()`, `Display`, `FromStr` (case-insensitive, aliases accepted), serde as the name, and the list
//! of valid names for error messages. Hyperparameters, metrics, phases and engines use it, so a name is
//! never spelt in two places.

/// The error of a `FromStr` made by [`crate::named_enum!`]: the unknown text and the valid names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownName {
    /// What the enum names (e.g. "loss").
    pub kind: &'static str,
    /// The text that matched no name.
    pub found: String,
    /// The valid names, in declaration order.
    pub expected: &'static [&'static str],
}

impl std::fmt::Display for UnknownName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "unknown {} `{}`; expected {}", self.kind, self.found, one_of(self.expected))
    }
}

impl std::error::Error for UnknownName {}

/// `a`, `a or b`, `a, b or c` with each name in backticks.
pub fn one_of(names: &[&str]) -> String {
    let q: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
    match q.split_last() {
        None => String::new(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}

/// Defines a fieldless enum with one name per variant (plus optional aliases):
/// `named_enum! { /// doc
///   pub enum Kind("kind") { /// doc
///     A = "a" | "alias", B = "b" } }`.
#[macro_export]
macro_rules! named_enum {
    ($(#[$m:meta])* $vis:vis enum $name:ident($kind:literal) {
        $( $(#[$vm:meta])* $var:ident = $s:literal $(| $alias:literal)* ),+ $(,)?
    }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        $vis enum $name { $( $(#[$vm])* $var ),+ }

        impl $name {
            /// Every canonical name, in declaration order.
            pub const NAMES: &'static [&'static str] = &[$($s),+];
            /// The canonical name.
            pub fn name(self) -> &'static str {
                match self { $($name::$var => $s),+ }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }

        impl std::str::FromStr for $name {
            type Err = $crate::util::names::UnknownName;
            fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
                let t = s.trim().to_ascii_lowercase();
                $( if t == $s $(|| t == $alias)* { return Ok($name::$var); } )+
                Err($crate::util::names::UnknownName { kind: $kind, found: s.trim().to_string(), expected: Self::NAMES })
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.serialize_str(self.name())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

#[cfg(test)]
mod tests {
    crate::named_enum! {
        /// A test enum.
        enum Fruit("fruit") {
            /// a
            Apple = "apple" | "malus",
            /// b
            Pear = "pear",
        }
    }

    #[test]
    fn names_round_trip_and_errors_list_the_choices() {
        assert_eq!("MALUS".parse::<Fruit>().unwrap(), Fruit::Apple);
        assert_eq!(Fruit::Pear.to_string(), "pear");
        assert_eq!(serde_json::to_string(&Fruit::Apple).unwrap(), "\"apple\"");
        assert_eq!(serde_json::from_str::<Fruit>("\"pear\"").unwrap(), Fruit::Pear);
        let e = "kiwi".parse::<Fruit>().unwrap_err().to_string();
        assert_eq!(e, "unknown fruit `kiwi`; expected `apple` or `pear`");
        assert!(serde_json::from_str::<Fruit>("\"kiwi\"").is_err());
    }
}
