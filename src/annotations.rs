//! `--annotation`: OCI annotations on the image manifest, on the descriptors that name it,
//! and (for builds that make one) on the image index, in buildx's syntax:
//! `[TYPE[,TYPE...]:]KEY=VALUE`, a type being `manifest` (the default), `manifest-descriptor`,
//! `index` or `index-descriptor`, each optionally for one platform (`manifest[linux/arm64]`).

use rbuild_dag::Platform;
use std::collections::BTreeMap;

/// What an annotation is written on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnnotationTarget {
    /// The image manifest's own `annotations`.
    Manifest,
    /// The descriptor that names the manifest (an OCI layout's `index.json` entry).
    ManifestDescriptor,
    /// The image index's own `annotations`.
    Index,
    /// The descriptor that names the index.
    IndexDescriptor,
}

impl AnnotationTarget {
    fn parse(s: &str) -> Option<AnnotationTarget> {
        Some(match s {
            "manifest" => AnnotationTarget::Manifest,
            "manifest-descriptor" => AnnotationTarget::ManifestDescriptor,
            "index" => AnnotationTarget::Index,
            "index-descriptor" => AnnotationTarget::IndexDescriptor,
            _ => return None,
        })
    }

    /// Whether this target exists only where the build makes an image index.
    pub fn needs_index(self) -> bool {
        matches!(
            self,
            AnnotationTarget::Index | AnnotationTarget::IndexDescriptor
        )
    }
}

/// One `--annotation` flag, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Annotation {
    /// Where it goes, each for every platform (`None`) or for one (`linux/arm64`).
    pub targets: Vec<(AnnotationTarget, Option<Platform>)>,
    /// The key.
    pub key: String,
    /// The value.
    pub value: String,
}

/// Parses one `--annotation` value (clap's value parser for the flag).
pub fn parse_annotation(s: &str) -> Result<Annotation, String> {
    let (k, value) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: want [TYPE:]KEY=VALUE"))?;
    let (types, key) = match k.split_once(':') {
        Some((t, key)) => (Some(t), key),
        None => (None, k),
    };
    if key.is_empty() || key.chars().any(char::is_whitespace) {
        return Err(format!("{s:?}: the key is empty or holds whitespace"));
    }
    let targets = match types {
        None => vec![(AnnotationTarget::Manifest, None)],
        Some(types) => types
            .split(',')
            .map(|t| parse_target(t).ok_or_else(|| format!("{s:?}: unknown annotation type {t:?} (want manifest, manifest-descriptor, index or index-descriptor, with an optional [OS/ARCH])")))
            .collect::<Result<_, _>>()?,
    };
    Ok(Annotation {
        targets,
        key: key.to_string(),
        value: value.to_string(),
    })
}

/// `TYPE` or `TYPE[PLATFORM]`.
fn parse_target(t: &str) -> Option<(AnnotationTarget, Option<Platform>)> {
    match t.split_once('[') {
        None => Some((AnnotationTarget::parse(t)?, None)),
        Some((ty, rest)) => {
            let p = Platform::parse(rest.strip_suffix(']')?).ok()?;
            Some((AnnotationTarget::parse(ty)?, Some(p)))
        }
    }
}

/// The annotations of `target` for an image of `platform` (for the index, `None`: those
/// given without a platform), the last of a key winning.
pub fn annotations_for(
    all: &[Annotation],
    target: AnnotationTarget,
    platform: Option<&Platform>,
) -> BTreeMap<String, String> {
    all.iter()
        .filter(|a| {
            a.targets
                .iter()
                .any(|(t, p)| *t == target && (p.is_none() || p.as_ref() == platform))
        })
        .map(|a| (a.key.clone(), a.value.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use AnnotationTarget::*;

    #[test]
    fn flags_parse_as_buildx_reads_them() {
        let a = parse_annotation("org.opencontainers.image.title=x=y").unwrap();
        assert_eq!(a.targets, vec![(Manifest, None)]);
        assert_eq!(
            (a.key.as_str(), a.value.as_str()),
            ("org.opencontainers.image.title", "x=y")
        );
        let a =
            parse_annotation("index,manifest[linux/arm64],manifest-descriptor[amd64]:k=").unwrap();
        assert_eq!(
            a.targets,
            vec![
                (Index, None),
                (Manifest, Some("linux/arm64".parse().unwrap())),
                (ManifestDescriptor, Some("linux/amd64".parse().unwrap()))
            ]
        );
        assert_eq!(a.value, "");
        for bad in [
            "k",
            "=v",
            "layer:k=v",
            "manifest[]:k=v",
            "manifest[a b]:k=v",
            "manifest:=v",
            "manifest[x:k=v",
        ] {
            assert!(parse_annotation(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn each_image_gets_its_own_and_the_shared_ones() {
        let all: Vec<_> = [
            "a=1",
            "manifest[linux/arm64]:b=2",
            "manifest[amd64]:c=3",
            "index:d=4",
            "a=5",
        ]
        .iter()
        .map(|s| parse_annotation(s).unwrap())
        .collect();
        let m = annotations_for(&all, Manifest, Some(&"linux/amd64".parse().unwrap()));
        assert_eq!(
            m,
            BTreeMap::from([("a".into(), "5".into()), ("c".into(), "3".into())])
        );
        assert_eq!(
            annotations_for(&all, Index, Some(&"linux/amd64".parse().unwrap())).len(),
            1
        );
        assert!(annotations_for(
            &all,
            ManifestDescriptor,
            Some(&"linux/amd64".parse().unwrap())
        )
        .is_empty());
    }
}
