// text.stats: counts and the ten most frequent words, as node/kinds/basic.py.

import { cmpCodePoints, codePointLength, decodeUTF8 } from "../util.js";

const WORD = /[\p{L}\p{N}_]+/gu;

export function textStatsKind(data) {
  const d = decodeUTF8(data);
  if (d.text === undefined) throw new Error(`input is not valid UTF-8: ${d.reason} at byte ${d.start}`);
  const text = d.text;
  const counts = new Map();
  let words = 0;
  for (const match of text.matchAll(WORD)) {
    const w = match[0].toLowerCase();
    counts.set(w, (counts.get(w) || 0) + 1);
    words++;
  }
  let lines = 0;
  for (let i = text.indexOf("\n"); i >= 0; i = text.indexOf("\n", i + 1)) lines++;
  if (text.length && !text.endsWith("\n")) lines++;
  const top = [...counts.entries()]
    .sort((a, b) => b[1] - a[1] || cmpCodePoints(a[0], b[0]))
    .slice(0, 10);
  return new Map([
    ["bytes", data.length],
    ["chars", codePointLength(text)],
    ["lines", lines],
    ["words", words],
    ["unique_words", counts.size],
    ["top_words", top.map(([w, c]) => [w, c])],
  ]);
}
