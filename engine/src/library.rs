//! The workflows shipped inside the binary (the `.toml` files of `workflows/`): what `ccluster
//! templates` lists, `ccluster init --template` writes, and `ccluster run --goal` applies.

pub struct Builtin {
    pub name: &'static str,
    pub text: &'static str,
}

/// In the order `ccluster templates` lists them.
pub const BUILTINS: &[Builtin] = &[
    Builtin {
        name: "goal",
        text: include_str!("../../workflows/goal.toml"),
    },
    Builtin {
        name: "map-files",
        text: include_str!("../../workflows/map-files.toml"),
    },
    Builtin {
        name: "tests-per-module",
        text: include_str!("../../workflows/tests-per-module.toml"),
    },
    Builtin {
        name: "review",
        text: include_str!("../../workflows/review.toml"),
    },
    Builtin {
        name: "docs",
        text: include_str!("../../workflows/docs.toml"),
    },
    Builtin {
        name: "feature-fanout",
        text: include_str!("../../workflows/feature-fanout.toml"),
    },
    Builtin {
        name: "hello",
        text: include_str!("../../workflows/hello.toml"),
    },
];

pub fn find(name: &str) -> Option<&'static Builtin> {
    BUILTINS.iter().find(|b| b.name == name)
}

impl Builtin {
    /// The source as a user's own file: the `#:schema` line of the repository is replaced by a
    /// pointer that works anywhere.
    pub fn as_user_file(&self) -> String {
        let body = self
            .text
            .lines()
            .filter(|l| !l.starts_with("#:schema"))
            .collect::<Vec<_>>()
            .join("\n");
        format!(
            "# From `ccluster init --template {}`. Editor support: `ccluster schema > clusterfile.schema.json`\n# and a first line `#:schema ./clusterfile.schema.json`. Reference: docs/clusterfile.md.\n{body}\n",
            self.name
        )
    }
}
