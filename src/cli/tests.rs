//! The command line's shape, and parsing details (the layering itself is tested
//! in `config::tests`).

use super::*;

#[test]
fn clap_definition_is_consistent() {
    Cli::command().debug_assert();
}

#[test]
fn every_flag_variable_is_named_after_its_flag() {
    fn walk(cmd: &clap::Command) {
        for arg in cmd.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            let want = format!(
                "{ENV_PREFIX}{}",
                long.to_ascii_uppercase().replace('-', "_")
            );
            match arg.get_env() {
                Some(env) => assert_eq!(env.to_str(), Some(want.as_str()), "--{long}"),
                None => assert!(
                    ["kafka-property", "help", "version"].contains(&long),
                    "--{long} has no environment variable"
                ),
            }
        }
        cmd.get_subcommands().for_each(walk);
    }
    walk(&Cli::command());
}

#[test]
fn run_has_the_flags_scripts_rely_on() {
    let cmd = Cli::command();
    let run = cmd.find_subcommand("run").expect("run");
    for long in [
        "postgres-url",
        "kafka-brokers",
        "table",
        "slot",
        "publication",
        "kafka-property",
        "no-create-slot",
        "no-create-publication",
        "no-create-topics",
        "topic",
        "topic-template",
        "header-column",
        "max-in-flight-records",
        "log-format",
    ] {
        assert!(
            run.get_arguments().any(|a| a.get_long() == Some(long)),
            "--{long}"
        );
    }
    // `check` takes the same settings; `run` adds only its one-shot --start-lsn.
    let check = cmd.find_subcommand("check").expect("check");
    assert_eq!(
        run.get_arguments().count(),
        check.get_arguments().count() + 1
    );
    assert!(run
        .get_arguments()
        .any(|a| a.get_long() == Some("start-lsn")));
}

#[test]
fn kafka_property_parsing() {
    assert_eq!(
        parse_kafka_property("linger.ms=5").unwrap(),
        ("linger.ms".into(), "5".into())
    );
    assert_eq!(
        parse_kafka_property("sasl.jaas.config=a=b c").unwrap(),
        ("sasl.jaas.config".into(), "a=b c".into())
    );
    assert_eq!(parse_kafka_property("k=").unwrap(), ("k".into(), "".into()));
    assert!(parse_kafka_property("compression.type")
        .unwrap_err()
        .contains("KEY=VALUE"));
    assert!(parse_kafka_property("=zstd").unwrap_err().contains("empty"));
    assert!(parse_kafka_property(" linger.ms=5")
        .unwrap_err()
        .contains("blanks"));
    let err = try_parse_with_env(
        ["outbox-relay", "run", "--kafka-property", "sasl.password"],
        &BTreeMap::new(),
    )
    .unwrap_err();
    assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
    assert!(err.to_string().contains("expected KEY=VALUE"), "{err}");
}

#[test]
fn negative_flags_and_their_variables() {
    let env = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let parse = |args: &[&str], e: &[(&str, &str)]| {
        let cli = try_parse_with_env(["outbox-relay", "run"].iter().chain(args).copied(), &env(e))
            .unwrap();
        let Command::Run(run) = cli.command else {
            unreachable!()
        };
        run.config.postgres.no_create_slot
    };
    assert_eq!(parse(&[], &[]), None);
    assert_eq!(parse(&["--no-create-slot"], &[]), Some(true));
    assert_eq!(parse(&["--no-create-slot=false"], &[]), Some(false));
    assert_eq!(
        parse(&[], &[("OUTBOX_RELAY_NO_CREATE_SLOT", "1")]),
        Some(true)
    );
    assert_eq!(
        parse(&[], &[("OUTBOX_RELAY_NO_CREATE_SLOT", "no")]),
        Some(false)
    );
    assert_eq!(
        parse(
            &["--no-create-slot"],
            &[("OUTBOX_RELAY_NO_CREATE_SLOT", "false")]
        ),
        Some(true)
    );
    assert!(try_parse_with_env(
        ["outbox-relay", "run"],
        &env(&[("OUTBOX_RELAY_NO_CREATE_SLOT", "maybe")])
    )
    .is_err());
}

#[test]
fn config_flag_is_global() {
    for args in [
        &["outbox-relay", "--config", "a.toml", "check"][..],
        &["outbox-relay", "check", "--config", "a.toml"][..],
    ] {
        let cli = try_parse_with_env(args.iter().copied(), &BTreeMap::new()).unwrap();
        assert_eq!(
            cli.config_file.as_deref(),
            Some(std::path::Path::new("a.toml"))
        );
    }
}

#[test]
fn debug_redacts_url_and_secret_properties() {
    let cli = try_parse_with_env(
        [
            "outbox-relay",
            "run",
            "--postgres-url",
            "postgres://relay:hunter2@db/app",
            "--kafka-property",
            "sasl.password=swordfish",
            "--kafka-property",
            "linger.ms=5",
        ],
        &BTreeMap::new(),
    )
    .unwrap();
    let debug = format!("{cli:?}");
    assert!(
        !debug.contains("hunter2") && !debug.contains("swordfish"),
        "{debug}"
    );
    assert!(
        debug.contains("postgres://relay:<redacted>@db/app") && debug.contains("linger.ms"),
        "{debug}"
    );
}

#[test]
fn edit_distance_works() {
    assert_eq!(edit_distance("OUTBOX_RELAY_SLOT", "OUTBOX_RELAY_SLOTT"), 1);
    assert_eq!(edit_distance("abc", "abc"), 0);
    assert_eq!(edit_distance("", "ab"), 2);
}
