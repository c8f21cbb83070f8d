// csv.summary, with a reader that follows CPython's csv module (strict=True, the
// dialect node/kinds/basic.py uses) line by line, so errors name the same line.

import { F64 } from "../json.js";
import { decodeUTF8Sig, pyStrRepr } from "../util.js";

const FIELD_LIMIT = 131072;
const NUMBER = /^[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$/;

export function parseNumberCell(cell) {
  if (!NUMBER.test(cell)) return null;
  const v = Number(cell) + 0;
  return Number.isFinite(v) ? v : null;
}

function* physicalLines(text) {
  let i = 0;
  const n = text.length;
  while (i < n) {
    let j = i;
    while (j < n) {
      const c = text.charCodeAt(j);
      if (c === 10) {
        j++;
        break;
      }
      if (c === 13) {
        j++;
        if (j < n && text.charCodeAt(j) === 10) j++;
        break;
      }
      j++;
    }
    yield text.slice(i, j);
    i = j;
  }
}

class CsvError extends Error {}

// Yields [row, lineNum] like csv.reader; throws Error("CSV line N: ...").
function* csvRows(text, delimiter) {
  const D = delimiter.charCodeAt(0);
  const Q = 34;
  const START_RECORD = 0, START_FIELD = 1, IN_FIELD = 2, IN_QUOTED = 3, QUOTE_IN_QUOTED = 4, EAT_CRNL = 5;
  let state = START_RECORD;
  let fields = [];
  let field = [];
  let fieldLen = 0;
  let lineNum = 0;
  const save = () => {
    fields.push(field.join(""));
    field = [];
    fieldLen = 0;
  };
  const add = (ch, code) => {
    if (!(code >= 0xdc00 && code <= 0xdfff)) {
      if (fieldLen >= FIELD_LIMIT) throw new CsvError(`field larger than field limit (${FIELD_LIMIT})`);
      fieldLen++;
    }
    field.push(ch);
  };
  const EOL = -1;
  const process = (c, ch) => {
    switch (state) {
      case START_RECORD:
        if (c === EOL) return;
        if (c === 10 || c === 13) {
          state = EAT_CRNL;
          return;
        }
        state = START_FIELD;
      // falls through
      case START_FIELD:
        if (c === 10 || c === 13 || c === EOL) {
          save();
          state = c === EOL ? START_RECORD : EAT_CRNL;
        } else if (c === Q) state = IN_QUOTED;
        else if (c === D) save();
        else {
          add(ch, c);
          state = IN_FIELD;
        }
        return;
      case IN_FIELD:
        if (c === 10 || c === 13 || c === EOL) {
          save();
          state = c === EOL ? START_RECORD : EAT_CRNL;
        } else if (c === D) {
          save();
          state = START_FIELD;
        } else add(ch, c);
        return;
      case IN_QUOTED:
        if (c === EOL) return;
        if (c === Q) state = QUOTE_IN_QUOTED;
        else add(ch, c);
        return;
      case QUOTE_IN_QUOTED:
        if (c === Q) {
          add(ch, c);
          state = IN_QUOTED;
        } else if (c === D) {
          save();
          state = START_FIELD;
        } else if (c === 10 || c === 13 || c === EOL) {
          save();
          state = c === EOL ? START_RECORD : EAT_CRNL;
        } else throw new CsvError(`'${delimiter}' expected after '"'`);
        return;
      case EAT_CRNL:
        if (c === 10 || c === 13) return;
        if (c === EOL) {
          state = START_RECORD;
          return;
        }
        throw new CsvError("new-line character seen in unquoted field - do you need to open the file with newline=''?");
    }
  };
  const lines = physicalLines(text);
  for (;;) {
    // one record
    do {
      const next = lines.next();
      if (next.done) {
        if (fieldLen !== 0 || field.length !== 0 || state === IN_QUOTED) {
          throw new Error(`CSV line ${lineNum}: unexpected end of data`);
        }
        return;
      }
      lineNum++;
      const line = next.value;
      try {
        for (let k = 0; k < line.length; k++) process(line.charCodeAt(k), line[k]);
        process(EOL, "");
      } catch (e) {
        if (e instanceof CsvError) {
          // CPython resets the parser and reports the line number read so far
          throw new Error(`CSV line ${lineNum}: ${e.message}`);
        }
        throw e;
      }
    } while (state !== START_RECORD);
    const row = fields;
    fields = [];
    yield [row, lineNum];
  }
}

export function csvReader(data, delimiter = ",") {
  const d = decodeUTF8Sig(data);
  if (d.text === undefined) throw new Error(`input is not valid UTF-8: ${d.reason}`);
  const it = csvRows(d.text, delimiter);
  let header = null;
  // (not for-of: breaking out of it would close the generator)
  for (let next = it.next(); !next.done; next = it.next()) {
    if (next.value[0].length) {
      header = next.value[0];
      break;
    }
  }
  if (header === null) throw new Error("CSV input has no header row");
  const seen = new Set();
  for (const name of header) {
    if (seen.has(name)) throw new Error(`CSV header has duplicate column ${pyStrRepr(name)}`);
    seen.add(name);
  }
  const width = header.length;
  function* body() {
    for (const [row, lineNum] of it) {
      if (!row.length) continue;
      if (row.length > width) throw new Error(`CSV line ${lineNum} has ${row.length} fields, header has ${width}`);
      yield row;
    }
  }
  return [header, body()];
}

function strip(s) {
  return s.replace(/^[ \t]+|[ \t]+$/g, "");
}

export function csvSummaryKind(data, p) {
  const delimiter = p.delimiter === undefined ? "," : p.delimiter;
  let [header, rows] = csvReader(data, delimiter);
  const width = header.length;
  const count = new Array(width).fill(0);
  const missing = new Array(width).fill(0);
  const numeric = new Array(width).fill(true);
  const low = new Array(width).fill(Infinity);
  const high = new Array(width).fill(-Infinity);
  const total = new Array(width).fill(0);
  let nRows = 0;
  for (const row of rows) {
    nRows++;
    for (let j = 0; j < row.length; j++) {
      const c = strip(row[j]);
      if (!c) {
        missing[j]++;
        continue;
      }
      count[j]++;
      if (numeric[j]) {
        const v = parseNumberCell(c);
        if (v === null) {
          numeric[j] = false;
          continue;
        }
        total[j] += v;
        if (v < low[j]) low[j] = v;
        if (v > high[j]) high[j] = v;
      }
    }
    for (let j = row.length; j < width; j++) missing[j]++;
  }
  const isNum = numeric.map((x, j) => x && count[j] > 0);
  const mean = isNum.map((x, j) => (x ? total[j] / count[j] : 0));
  const m2 = new Array(width).fill(0);
  const counters = isNum.map((x) => (x ? null : new Map()));
  [, rows] = csvReader(data, delimiter);
  for (const row of rows) {
    for (let j = 0; j < row.length; j++) {
      const c = strip(row[j]);
      if (!c) continue;
      const counter = counters[j];
      if (counter === null) {
        const d = Number(c) + 0 - mean[j];
        m2[j] += d * d;
      } else counter.set(c, (counter.get(c) || 0) + 1);
    }
  }
  const columns = new Map();
  header.forEach((name, j) => {
    const col = new Map([
      ["count", count[j]],
      ["missing", missing[j]],
      ["numeric", isNum[j]],
    ]);
    const counter = counters[j];
    if (counter === null) {
      col.set("min", new F64(low[j]));
      col.set("max", new F64(high[j]));
      col.set("mean", new F64(mean[j]));
      col.set("std", new F64(Math.sqrt(m2[j] / count[j])));
    } else {
      col.set("unique", counter.size);
      let top = null;
      let best = 0;
      for (const [value, n] of counter) {
        if (n > best) {
          best = n;
          top = value;
        }
      }
      col.set("top", top);
    }
    columns.set(name, col);
  });
  return new Map([
    ["rows", nRows],
    ["columns", columns],
  ]);
}
