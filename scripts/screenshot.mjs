// Screenshots a page in headless Chromium (Debian's, driven by playwright-core), for the
// README's status-page picture: node scripts/screenshot.mjs URL OUT.png [WIDTH]
import { chromium } from "playwright-core";

const [url, out, width = "1280"] = process.argv.slice(2);
if (!url || !out) {
  console.error("usage: node scripts/screenshot.mjs URL OUT.png [WIDTH]");
  process.exit(2);
}
const browser = await chromium.launch({
  executablePath: process.env.FERRY_CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"],
});
try {
  const page = await browser.newPage({ viewport: { width: Number(width), height: 800 } });
  await page.goto(url, { waitUntil: "load" });
  await page.screenshot({ path: out, fullPage: true });
  console.error(`wrote ${out}`);
} finally {
  await browser.close();
}
