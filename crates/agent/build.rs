//! Builds the embedded app chart from the upstream archive and the patch in
//! `assets/universal-chart-patch/` (see its README). The protocol is compiled in `crates/proto`.

use std::io::{Read, Write};
use std::path::Path;

const UPSTREAM_CHART: &str = "assets/universal-chart-2.8.1.tgz";
const CHART_PATCH: &str = "assets/universal-chart-patch";
const PATCHED_VERSION: &str = "2.8.1-shapeblock.1";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={UPSTREAM_CHART}");
    println!("cargo:rerun-if-changed={CHART_PATCH}");
    let out = Path::new(&std::env::var("OUT_DIR")?).join("universal-chart.tgz");
    std::fs::write(out, patched_chart()?)?;
    Ok(())
}

/// The upstream archive with the values helper replaced and the version marked, entry by entry
/// in upstream order with upstream headers, gzipped without a timestamp: the same inputs give
/// the same bytes.
fn patched_chart() -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    let helper = std::fs::read(Path::new(CHART_PATCH).join("_tplvalues.tpl"))?;
    let upstream = std::fs::read(UPSTREAM_CHART)?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(upstream.as_slice()));
    let mut builder = tar::Builder::new(Vec::new());
    let (mut helper_replaced, mut version_marked) = (false, false);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.to_string_lossy().into_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data)?;
        if path == "universal-chart/templates/helpers/_tplvalues.tpl" {
            data = helper.clone();
            helper_replaced = true;
        } else if path == "universal-chart/Chart.yaml" {
            let text = String::from_utf8(data)?;
            let marked = text.replace("\nversion: 2.8.1\n", &format!("\nversion: {PATCHED_VERSION}\n"));
            version_marked = marked != text;
            data = marked.into_bytes();
        }
        let mut header = entry.header().clone();
        header.set_size(data.len() as u64);
        header.set_cksum();
        builder.append(&header, data.as_slice())?;
    }
    if !helper_replaced || !version_marked {
        return Err(format!("{UPSTREAM_CHART} is not the chart {CHART_PATCH} patches").into());
    }
    let tar = builder.into_inner()?;
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::best());
    gz.write_all(&tar)?;
    Ok(gz.finish()?)
}
