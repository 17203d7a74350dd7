/**
 * Renders an SVG to PNG with resvg (@resvg/resvg-js: a Rust SVG renderer shipped as a prebuilt
 * Node-API binary per platform, no install scripts). Text uses the system's fonts; DejaVu Sans
 * is the default family, as on Debian.
 * @param zoom scale factor: 2 gives crisp text on high-density screens and in READMEs.
 */
export function svgToPng(svg: string, zoom = 2): Buffer {
  // Loaded on use: only `ferry trace timeline --out x.png` needs the native renderer.
  const { Resvg } = require("@resvg/resvg-js") as typeof import("@resvg/resvg-js");
  const renderer = new Resvg(svg, {
    fitTo: { mode: "zoom", value: zoom },
    background: "#ffffff",
    font: { loadSystemFonts: true, defaultFontFamily: "DejaVu Sans" },
  });
  return renderer.render().asPng();
}
