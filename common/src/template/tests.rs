use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn render(src: &str, pairs: &[(&str, &str)]) -> Result<String, TemplateError> {
    let v = vars(pairs);
    Template::parse(src)?.render(&Scope::with_vars(&v))
}

#[test]
fn flat_and_env_lookups() {
    let v = [("vpc_id", "vpc-1"), ("region", "eu")];
    assert_eq!(
        render("{{.vpc_id}}/{{.env.region}}/{{ .Env.region }}", &v).unwrap(),
        "vpc-1/eu/eu"
    );
}

#[test]
fn auth_tokens() {
    let v = BTreeMap::new();
    let auth = vars(&[("api", "tok")]);
    let scope = Scope {
        vars: Some(&v),
        auth: Some(&auth),
        ..Scope::default()
    };
    assert_eq!(
        Template::parse("Bearer {{.auth.api}}")
            .unwrap()
            .render(&scope)
            .unwrap(),
        "Bearer tok"
    );
    let err = Template::parse("{{.auth.other}}")
        .unwrap()
        .render(&scope)
        .unwrap_err();
    assert_eq!(
        err.kind,
        TemplateErrorKind::MissingVariable("auth.other".into())
    );
}

#[test]
fn missing_variable_is_an_error_naming_it() {
    let err = render("x {{.vpc_id}}", &[]).unwrap_err();
    assert_eq!(
        err.kind,
        TemplateErrorKind::MissingVariable("vpc_id".into())
    );
    assert_eq!(err.message, "variable `vpc_id` is not defined");
    assert_eq!(err.offset, 4);
    let err = render("{{ upper .env.nope }}", &[]).unwrap_err();
    assert_eq!(
        err.kind,
        TemplateErrorKind::MissingVariable("env.nope".into())
    );
}

#[test]
fn default_accepts_missing_and_empty() {
    assert_eq!(render(r#"{{.x | default "y"}}"#, &[]).unwrap(), "y");
    assert_eq!(
        render(r#"{{.x | default "y"}}"#, &[("x", "")]).unwrap(),
        "y"
    );
    assert_eq!(
        render(r#"{{.x | default "y"}}"#, &[("x", "set")]).unwrap(),
        "set"
    );
    assert_eq!(render(r#"{{default "y" .x}}"#, &[]).unwrap(), "y");
}

#[test]
fn functions() {
    let v = [("a", "Hello World"), ("n", "3"), ("env", "production")];
    assert_eq!(render("{{.a | upper}}", &v).unwrap(), "HELLO WORLD");
    assert_eq!(render("{{lower .a}}", &v).unwrap(), "hello world");
    assert_eq!(render(r#"{{trim "  x  "}}"#, &v).unwrap(), "x");
    assert_eq!(
        render(r#"{{eq .n "3"}} {{eq .n 3}} {{ne .n "4"}}"#, &v).unwrap(),
        "true true true"
    );
    assert_eq!(
        render(r#"{{and true "x"}} {{or "" "y"}} {{not false}}"#, &v).unwrap(),
        "x y true"
    );
    assert_eq!(render("{{.a | urlquery}}", &v).unwrap(), "Hello+World");
    assert_eq!(render("{{.a | b64enc}}", &v).unwrap(), "SGVsbG8gV29ybGQ=");
    assert_eq!(
        render(r#"{{printf "%s-%d%%" .a 5}}"#, &v).unwrap(),
        "Hello World-5%"
    );
    assert_eq!(render(r#"{{ "a\"b" | json }}"#, &v).unwrap(), r#"a\"b"#);
}

#[test]
fn control_structures() {
    let v = [("e", "prod")];
    let src = r#"{{if eq .e "dev"}}D{{else if eq .e "prod"}}P{{else}}O{{end}}"#;
    assert_eq!(render(src, &v).unwrap(), "P");
    assert_eq!(render("{{with .e}}[{{.}}]{{end}}", &v).unwrap(), "[prod]");
    assert_eq!(render("a  {{- .e -}}  b", &v).unwrap(), "aprodb");
    assert_eq!(render("a{{/* note */}}b", &v).unwrap(), "ab");
}

#[test]
fn values_are_inserted_once() {
    let v = [("x", "{{.y}}"), ("y", "secret")];
    assert_eq!(render("{{.x}}", &v).unwrap(), "{{.y}}");
}

#[test]
fn json_string_escape_mode_keeps_values_one_string() {
    let v = vars(&[("x", r#""}, "admin": true, "x": {""#)]);
    let t = Template::parse(r#"{"name": "{{.x}}"}"#).unwrap();
    let out = t
        .render_with(&Scope::with_vars(&v), Escape::JsonString)
        .unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        parsed["name"],
        serde_json::json!(r#""}, "admin": true, "x": {""#)
    );
    assert_eq!(parsed.as_object().unwrap().len(), 1);
}

#[test]
fn json_document_mode_keeps_each_value_one_json_value() {
    let injection = r#""}, "admin": true, "x": {""#;
    let v = vars(&[
        ("x", injection),
        ("n", "3"),
        ("list", r#"["a","b"]"#),
        ("word", "plain"),
    ]);
    let t = Template::parse(
        r#"{"name": "{{.x}}", "n": {{.n}}, "list": {{.list}}, "raw": {{.x}}, "word": {{.word}}, "q": "a\"{{.word}}"}"#,
    )
    .unwrap();
    let out = t
        .render_with(&Scope::with_vars(&v), Escape::JsonDocument)
        .unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(parsed["name"], serde_json::json!(injection));
    assert_eq!(parsed["raw"], serde_json::json!(injection));
    assert_eq!(parsed["n"], serde_json::json!(3));
    assert_eq!(parsed["list"], serde_json::json!(["a", "b"]));
    assert_eq!(parsed["word"], serde_json::json!("plain"));
    assert_eq!(parsed["q"], serde_json::json!("a\"plain"));
    assert_eq!(parsed.as_object().unwrap().len(), 6, "{out}");
}

#[test]
fn syntax_errors_point_at_the_problem() {
    let err = Template::parse("line one\n  {{.vpc_id").unwrap_err();
    assert_eq!(err.kind, TemplateErrorKind::Syntax);
    assert_eq!(line_col("line one\n  {{.vpc_id", err.offset), (1, 2));
    assert!(err.message.contains("unclosed action"), "{}", err.message);

    let err = Template::parse("{{if .x}}a").unwrap_err();
    assert!(err.message.contains("never closed"), "{}", err.message);
    let err = Template::parse("{{end}}").unwrap_err();
    assert!(
        err.message.contains("unexpected `{{end}}`"),
        "{}",
        err.message
    );
    let err = Template::parse("{{range .x}}{{end}}").unwrap_err();
    assert!(
        err.message.contains("`range` is not supported"),
        "{}",
        err.message
    );
    let err = Template::parse(r#"{{ "abc }}"#).unwrap_err();
    assert!(
        err.message.contains("unterminated string"),
        "{}",
        err.message
    );
    let err = Template::parse("{{ .a .b }}").unwrap_err();
    assert!(err.message.contains("only a function"), "{}", err.message);
}

/// Found when parsing (so `stages validate` reports it), no longer only when rendering.
#[test]
fn unknown_function_is_a_parse_error() {
    let err = Template::parse("{{ frob .x }}").unwrap_err();
    assert_eq!(err.message, "unknown function `frob`");
    assert_eq!(err.kind, TemplateErrorKind::Syntax);
    assert_eq!(err.offset, 3);
    assert!(err.help.unwrap().contains("contains"));
}

#[test]
fn contains_takes_the_substring_first() {
    assert_eq!(
        render(
            r#"{{ contains "prod" .e }}/{{ contains "x" .e }}"#,
            &[("e", "eu-prod-1")]
        )
        .unwrap(),
        "true/false"
    );
}

#[test]
fn references_list_what_is_read() {
    let t = Template::parse(
        r#"{{.a}} {{.env.b}} {{.auth.c}} {{.d | default "x"}} {{ default "y" .e }} {{ success "infra" }} {{with .f}}{{.inner}}{{end}}"#,
    )
    .unwrap();
    let refs: Vec<String> = t
        .references()
        .into_iter()
        .map(|r| match r {
            Reference::Var { name, optional, .. } => format!("var:{name}:{optional}"),
            Reference::Auth { name, .. } => format!("auth:{name}"),
            Reference::Stage { name, .. } => format!("stage:{name}"),
        })
        .collect();
    assert_eq!(
        refs,
        [
            "var:a:false",
            "var:b:false",
            "auth:c",
            "var:d:true",
            "var:e:true",
            "stage:infra",
            "var:f:false"
        ]
    );
}

#[test]
fn success_and_failed_need_outcomes() {
    let v = BTreeMap::new();
    let mut outcomes = StageOutcomes::new();
    outcomes.insert("infra".into(), StageOutcome::Succeeded);
    outcomes.insert("db".into(), StageOutcome::Failed);
    let scope = Scope {
        vars: Some(&v),
        stage_outcomes: Some(&outcomes),
        ..Scope::default()
    };
    let t = Template::parse(r#"{{success "infra"}} {{failed "db"}} {{success "other"}}"#).unwrap();
    assert_eq!(t.render(&scope).unwrap(), "true true false");
    assert!(t.render(&Scope::with_vars(&v)).is_err());
}

#[test]
fn base64_matches_rfc4648_vectors() {
    for (input, want) in [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ] {
        assert_eq!(base64_encode(input.as_bytes()), want);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Parsing never panics, and a parse error's offset lies inside the input.
    #[test]
    fn parse_never_panics(src in "(\\{\\{|\\}\\}|[ .a-z|()\"`$-]|if|end|else|with|default|/\\*|\\*/){0,40}") {
        match Template::parse(&src) {
            Ok(t) => {
                let v = vars(&[("a", "1")]);
                let _ = t.render(&Scope::with_vars(&v));
                let _ = t.references();
            }
            Err(e) => prop_assert!(e.offset <= src.len()),
        }
    }

    /// Text without `{{` renders to itself.
    #[test]
    fn plain_text_is_unchanged(src in "[^{]{0,64}") {
        let t = Template::parse(&src).unwrap();
        prop_assert!(t.is_literal());
        prop_assert_eq!(t.render(&Scope::default()).unwrap(), src);
    }

    /// Any value is inserted verbatim (no second pass), and JSON-escaped insertion always
    /// yields one valid JSON string.
    #[test]
    fn values_round_trip(value in any::<String>()) {
        let v = vars(&[("x", &value)]);
        let t = Template::parse("{{.x}}").unwrap();
        prop_assert_eq!(t.render(&Scope::with_vars(&v)).unwrap(), value.clone());
        let t = Template::parse("\"{{.x}}\"").unwrap();
        let json = t.render_with(&Scope::with_vars(&v), Escape::JsonString).unwrap();
        let back: String = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(back, value);
    }
}

fn url(template: &str, pairs: &[(&str, &str)]) -> Result<String, TemplateError> {
    let v = vars(pairs);
    Template::parse(template)
        .unwrap()
        .render_with(&Scope::with_vars(&v), Escape::Url)
}

#[test]
fn url_values_cannot_change_the_resource() {
    let api = ("api", "http://127.0.0.1:9/base");
    // Resource ids that are paths are fine; so is the base URL itself.
    assert_eq!(
        url("{{.api}}/items/{{.id}}", &[api, ("id", "subs/1/rg/x.y")]).unwrap(),
        "http://127.0.0.1:9/base/items/subs/1/rg/x.y"
    );
    // A value that would climb out, add a query or a fragment, or smuggle a control
    // character is an error naming it.
    for bad in [
        "../../leak?code=201&",
        "..",
        "a/./b",
        "x?y=1",
        "x#frag",
        "a\nb",
        "a\0b",
    ] {
        let err = url("{{.api}}/items/{{.item_id}}", &[api, ("item_id", bad)]).unwrap_err();
        assert!(
            err.message
                .contains("variable `item_id` inserted into the URL adds"),
            "{bad:?}: {}",
            err.message
        );
        assert!(err.help.unwrap().contains("urlpathescape"));
    }
    // In the query, values are encoded.
    assert_eq!(
        url("{{.api}}/search?q={{.q}}&n=1", &[api, ("q", "a b&c=d#e")]).unwrap(),
        "http://127.0.0.1:9/base/search?q=a+b%26c%3Dd%23e&n=1"
    );
    // Explicit encoding: one path segment, or a query value, inserted as encoded.
    assert_eq!(
        url(
            "{{.api}}/items/{{urlpathescape .id}}",
            &[api, ("id", "../a b/c")]
        )
        .unwrap(),
        "http://127.0.0.1:9/base/items/..%2Fa%20b%2Fc"
    );
    // Encoding does not make `..` a safe segment.
    assert!(url("{{.api}}/items/{{urlpathescape .id}}", &[api, ("id", "..")]).is_err());
    assert_eq!(
        url("{{.api}}/s?q={{urlquery .q}}", &[api, ("q", "a&b")]).unwrap(),
        "http://127.0.0.1:9/base/s?q=a%26b"
    );
    // Outside URLs nothing changes.
    let v = vars(&[("id", "../x")]);
    assert_eq!(
        Template::parse("/{{.id}}")
            .unwrap()
            .render(&Scope::with_vars(&v))
            .unwrap(),
        "/../x"
    );
}
