//! Rendering and signing campaign messages: a 20 KB HTML newsletter (plus its text part)
//! personalised for a recipient, MIME-encoded and DKIM-signed, as the render threads of
//! `mxpipe send campaign.toml` do for every recipient. Throughput is in messages.
//!
//! Run: `cargo bench --bench campaign`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mxpipe::campaign::Campaign;
use std::fmt::Write as _;
use std::hint::black_box;
use std::path::PathBuf;

/// An RSA-2048 key made for this benchmark with `openssl genpkey`; it signs nothing real.
const RSA_2048_PEM: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQDkh/k/QHneSAvW\n\
wk0WVSUtqIS8yPHU/TMrCAx1yxsB/94OmjfvlD8cjKHVT2TA/DsVrQTElPWcVRgh\n\
wgGVhf8DC+tnQ1C8gx979EERrbCcTkKhP4Mc4ZiDZEAiKXW9p6+kLstrT2IflY+g\n\
kSzYn3k/E3Rk2Qq520DRVw7YTICXOSor43pX2jdQSYGCeIFbql3e2Kl3PZnJLVY/\n\
zvOgTbEiJFggtkiyWhXvEUlzo3eUYXW06A9+ZJknhJ8w/YalajDcm1glED1i7k3Z\n\
mcE6BX1R6LnVZ5HFwDksY/eXe+TW8/3FhVEdXgB/+NIg3qC+/c19nNw0HapgR/x8\n\
buQ0xOCZAgMBAAECggEAF5aTWvyAN7nPAwU+KLJ0KnDM9qF1GKtj1yq3AoeKy5uJ\n\
4472fBOcqgk4AQj3WNYQES4xIktPyKmd2oooWLMifcGCtD9l+3c7TjOJbdY0NwX6\n\
6aLhGR+N+u3jksMdxIwk3Hj6BSMF+UWaNBQYAWoAfUq4RlqCuWlQmOr3/Mp0sWcC\n\
pCVCrvCmbBoPH8QvqbDrk2bqTlkbigxzPvDsLv8qyHMllL+NqSKdctATXTvWn2sy\n\
CNe7HNbDHoTIFqMCXDel0V+5jLCw6mGLTx24fpSkDIQbsywyo4aCmSnNCX79460u\n\
Muko6vLEMCrUi+m0UXfDzcdIi6JBM7E2vAA2c7ApYwKBgQD7LPQQ/L09TSlzS1A0\n\
a1lSr1gW6faGljA/TycZHsCttOxcZ9FJ4g02m9YciumG/fw5pVskhD/qUDihY00V\n\
gESMSMyluK9zD1Zl16S+AcGvF2lhrPay3cPH+UeBpkyuoYzEVuh8OO+y6ZrdR66H\n\
L9lOl4jamj9R1jwhu+x/fRRnkwKBgQDo660Otd70WEuWVI0Lrik4lkAw3Wq6mVb/\n\
T2mJophHzrWIHGIJl54Vchewe7AzQo67pwhP3kaEhSPQtvW3eIS55umgVjrY2yxd\n\
Eu3kwysgQDS+kubW7nOvmVB9T4LVc9NGhdrFVYXHzyIdsUVvepb7/hZXIg9cYepO\n\
2ee0jfYaowKBgQCxep4qsqt0+WTklr7hi0jeaA+ygTc0+kK1OVTDJzu2gjTRRnpX\n\
3ma/w3WTTYSdYjIq+XBhaSFQi8a4ItaA7tWA2p/gKZOvlZLS+4Do0YzuD3jjD7hx\n\
wsloL/ga4EsmyfgRc+dqf0DABtjqqo/j7id6pRCKhptfVCXBIGyH2PXmCQKBgCjN\n\
yLZwBAv4P92pGEB4lT4VjE9DKsRfwo7dgZacBmNmAgVDO6WEiywknaPMN1Tzjv+u\n\
xlT/koj6rgiNVMR8d3v9yOXO1WZSFxaDD2vpCPAQb20HXStAAMI9cI1TVY9BSDzt\n\
jCLP1azoS4i6GnjqF/MzUwSWsew0NxDzOZU23WtTAoGAcytQBxmGGw6QETo7Zt1+\n\
raE4w3pkTsGaPuZg/nSuZIvJp99yxj9BUJACk9EoDm/85FgEOKG07+5JTWnOYlh1\n\
kjM2NXfeZ0JmVk2uP8KyqNq1v8yTDffHoKQQenhLXLBr0ErBA7cEd+GCj/V4gGAl\n\
Im65tJYyNlwqJjf0nxff0Fs=\n\
-----END PRIVATE KEY-----\n\
";

/// An Ed25519 key (RFC 8410 PKCS#8) made for this benchmark; it signs nothing real.
const ED25519_PEM: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MC4CAQAwBQYDK2VwBCIEIJ9boColXRk2aeXa7aqzMPxV+rjoyjrVUrr5f+H9QcVh\n\
-----END PRIVATE KEY-----\n\
";

/// A campaign directory with a 20 KB HTML newsletter, its text part and 1,000 recipients.
struct Newsletter {
    dir: PathBuf,
}

impl Newsletter {
    fn new() -> Newsletter {
        let dir =
            std::env::temp_dir().join(format!("mxpipe-bench-campaign-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut html = String::from(
            "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{{first_name}}'s weekly digest</title></head>\n<body style=\"font-family: Helvetica, Arial, sans-serif; margin: 0; padding: 0\">\n<p>Dear {{first_name}} {{last_name}},</p>\n",
        );
        let mut n = 0;
        while html.len() < 20_000 {
            n += 1;
            writeln!(
                html,
                "<table role=\"presentation\" width=\"100%\" cellpadding=\"0\" cellspacing=\"0\"><tr><td style=\"padding: 12px 24px; border-bottom: 1px solid #e5e5e5\"><h2 style=\"margin: 0 0 8px 0; font-size: 18px\">Story {n}: what happened this week in Zürich</h2><p style=\"margin: 0; line-height: 1.5\">A paragraph of news that runs on for a while, with <a href=\"https://example.org/articles/{n}?utm_source=newsletter&amp;utm_medium=email&amp;id={{{{id}}}}\">a tracked link</a> for {{{{first_name}}}}.</p></td></tr></table>"
            )
            .unwrap();
        }
        html.push_str("<p>Unsubscribe: <a href=\"https://example.org/u/{{id}}\">one click</a></p>\n</body></html>\n");
        let text = "Dear {{first_name}},\n\nThis week's stories are in the HTML part; here is the short version.\n".repeat(40);
        let mut csv = String::from("email,first_name,last_name,id\n");
        for i in 0..1000 {
            writeln!(csv, "reader{i}@example.net,Jöran{i},Müller,{i}").unwrap();
        }
        let write = |name: &str, content: &str| {
            std::fs::write(dir.join(name), content).expect("write fixture");
        };
        write("newsletter.html", &html);
        write("newsletter.txt", &text);
        write("recipients.csv", &csv);
        write("rsa.pem", RSA_2048_PEM);
        write("ed25519.pem", ED25519_PEM);
        Newsletter { dir }
    }

    fn campaign(&self, dkim: Option<(&str, &str)>) -> Campaign {
        let mut toml = String::from(
            r#"from = "Weekly Digest <digest@example.org>"
subject = "Your digest, {{first_name}}: five stories from Zürich"
text_file = "newsletter.txt"
html_file = "newsletter.html"
recipients = "recipients.csv"
return_path = "bounces+{local}={domain}@example.org"

[list_unsubscribe]
url = "https://example.org/u/{{id}}"
mailto = "unsubscribe@example.org"

[delivery]
relay = "127.0.0.1:25"
"#,
        );
        if let Some((key, algorithm)) = dkim {
            write!(
                toml,
                "\n[dkim]\ndomain = \"example.org\"\nselector = \"bench\"\nkey_file = \"{key}\"\nalgorithm = \"{algorithm}\"\n"
            )
            .unwrap();
        }
        let path = self.dir.join("campaign.toml");
        std::fs::write(&path, toml).expect("write campaign.toml");
        Campaign::load(&path).unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Drop for Newsletter {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn render_and_sign(c: &mut Criterion) {
    let newsletter = Newsletter::new();
    let mut g = c.benchmark_group("campaign_render_20k_html");
    g.throughput(Throughput::Elements(1));
    for (name, dkim) in [
        ("unsigned", None),
        ("rsa-2048", Some(("rsa.pem", "rsa-sha256"))),
        ("ed25519", Some(("ed25519.pem", "ed25519-sha256"))),
    ] {
        let campaign = newsletter.campaign(dkim);
        let size = campaign.render(0).expect("renders").content.len();
        eprintln!("campaign_render_20k_html/{name}: {size} octets per message");
        let mut i = 0;
        g.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 1) % campaign.len();
                black_box(campaign.render(i).expect("renders"))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, render_and_sign);
criterion_main!(benches);
