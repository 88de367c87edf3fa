//! The map page: one self-contained HTML file (inline CSS and script, nothing fetched but
//! the data) that draws [`crate::query::map::MapAnswer`] as a graph, with the edges' table
//! and their paths hop by hop.
//!
//! Served as it is ([`MAP_PAGE`]) next to the API, it fetches `v1/map?window_s=W`
//! (relative to its own URL) every few seconds. Written with the answer inlined
//! ([`static_map_page`]), it draws that answer and fetches nothing: a file to open offline.
//!
//! The contract between the two: the page holds
//! `<script id="flowtrace-map-data" type="application/json">/*FLOWTRACE-MAP-DATA*/</script>`
//! once; the page's script takes the element's text as the map when it starts with `{`, and
//! goes live otherwise. [`static_map_page`] puts the JSON in place of [`MAP_DATA_MARKER`]
//! with every `<` written `\u003c` (the same string to a JSON parser), so nothing in the
//! data can close the script element or open a comment in it.

/// The page, as served at `GET /map`.
pub const MAP_PAGE: &str = include_str!("assets/map.html");

/// What [`static_map_page`] replaces with the map's JSON (it is in [`MAP_PAGE`] once).
pub const MAP_DATA_MARKER: &str = "/*FLOWTRACE-MAP-DATA*/";

/// The page with `answer_json` (a serialized `MapAnswer`) inlined: it draws that map and
/// fetches nothing.
pub fn static_map_page(answer_json: &str) -> String {
    let inlined = answer_json.trim().replace('<', "\\u003c");
    MAP_PAGE.replacen(MAP_DATA_MARKER, &inlined, 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_holds_the_marker_once_and_nothing_from_outside() {
        assert_eq!(MAP_PAGE.matches(MAP_DATA_MARKER).count(), 1);
        for outside in [
            "src=\"http",
            "href=\"http",
            "@import",
            "url(http",
            "//cdn",
            "innerHTML",
        ] {
            assert!(!MAP_PAGE.contains(outside), "the page names {outside:?}");
        }
        assert!(
            MAP_PAGE.len() < 60_000,
            "the page is {} bytes; keep it under 60 kB",
            MAP_PAGE.len()
        );
    }

    #[test]
    fn the_inlined_page_carries_the_data_and_cannot_be_closed_by_it() {
        let hostile = "</script><script>alert(1)</script><!-- x";
        let answer = serde_json::json!({
            "nodes": ["node1"],
            "missing": [{"agent": "https://10.0.0.3:9443", "error": hostile}],
            "window_s": 300,
            "generated_unix_ns": 1,
            "vertices": [{"id": "workload/shop/front-end", "kind": "workload",
                          "namespace": "shop", "name": "front-end"}],
            "edges": [],
        });
        let json = serde_json::to_string(&answer).expect("a map serializes");
        let page = static_map_page(&json);
        assert!(!page.contains(MAP_DATA_MARKER));
        // The page's own two script elements, and not one from the data.
        assert_eq!(page.matches("</script>").count(), 2);
        assert!(!page.contains("<!-- x"));
        let start = page
            .find("type=\"application/json\">")
            .expect("the data element")
            + "type=\"application/json\">".len();
        let end = start + page[start..].find("</script>").expect("its end");
        let back: serde_json::Value =
            serde_json::from_str(&page[start..end]).expect("the inlined text is JSON");
        assert_eq!(back, answer);
        assert_eq!(back["missing"][0]["error"], hostile);
    }
}
