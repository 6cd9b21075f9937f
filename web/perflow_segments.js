// PeRFlow Settings' values as the editor reads and writes them: the `segments`, `boundaries` and `theta`
// widgets' text, the K windows and the step grid. The rules are perflow_core's (segments.py, settings.py,
// theta.py); the grid is computed with the same float operations so it gives the same integer timesteps.
// No side effects: ComfyUI imports every .js file of the pack's web folder.

export const T = 1000;
export const THETA_COLUMNS = ["gain", "window-end scale", "output change"];

const ACCEPTED_BOUNDARIES = `numbers strictly decreasing from ${T} (or ${T - 1}) to 0, e.g. '1000, 700, 400, 150, 0'`;

function jsonValue(text) {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

function numbersOfText(text) {
  // Python's json.loads first (a list), else numbers separated by commas, semicolons or spaces.
  const json = jsonValue(text);
  return json !== undefined ? json : text.replace(/;/g, ",").replace(/,/g, " ").split(/\s+/).filter(Boolean).map(Number);
}

function isNumber(value) {
  return typeof value === "number" && Number.isFinite(value);
}

/** The `boundaries` text: {values} ([T, ..., 0], the noise end read as T), null values for "" (uniform), or {error}. */
export function parseBoundaries(text) {
  if (!String(text ?? "").trim()) return { values: null };
  const values = numbersOfText(String(text));
  if (!Array.isArray(values) || !values.every(isNumber)) return { error: `boundaries must be ${ACCEPTED_BOUNDARIES}; got '${text}'` };
  if (values.length < 2) return { error: `boundaries need at least 2 entries (${ACCEPTED_BOUNDARIES})` };
  if (values.some((v, i) => i > 0 && v >= values[i - 1])) return { error: `boundaries must be strictly decreasing (${ACCEPTED_BOUNDARIES})` };
  if (values[0] !== T && values[0] !== T - 1) return { error: `boundaries must start at ${T} (or ${T - 1}); got ${values[0]}` };
  if (values[values.length - 1] !== 0) return { error: `boundaries must end at 0; got ${values[values.length - 1]}` };
  if (values.some((v, i) => i > 0 && values[i - 1] - v < 1)) return { error: "boundaries: each segment must be at least one training timestep wide" };
  return { values: [T, ...values.slice(1)] };
}

/** K equal windows' boundaries in timesteps (floats where K does not divide T). */
export function uniformBoundaries(k) {
  return Array.from({ length: k + 1 }, (_, i) => ((1.0 * (k - i)) / k) * T);
}

export function isUniform(values) {
  const uniform = uniformBoundaries(values.length - 1);
  return values.every((v, i) => Math.abs(v - uniform[i]) < 1e-6);
}

/** The `boundaries` text for integer boundaries: "" when they are K equal windows (what "" means). */
export function formatBoundaries(values) {
  return isUniform(values) ? "" : values.map((v) => String(Math.round(v))).join(", ");
}

function zeroRows(k) {
  return Array.from({ length: k }, () => [0, 0, 0]);
}

function padRow(row) {
  return [...row, 0, 0, 0].slice(0, 3);
}

function typedThetaRows(text, k) {
  // rows separated by ';' or new lines, numbers by ',' or spaces; one row of K numbers is the gain column
  const rows = text.replace(/\n/g, ";").split(";").filter((row) => row.trim())
    .map((row) => row.replace(/,/g, " ").split(/\s+/).filter(Boolean).map(Number));
  return rows.length === 1 && k > 1 && rows[0].length === k ? rows[0].map((v) => [v]) : rows;
}


/** The `theta` text as K rows of 3 numbers ("" is zero), or {error}. */
export function parseTheta(text, k) {
  text = String(text ?? "");
  if (!text.trim()) return { rows: zeroRows(k) };
  const accepted = `one row per segment (${k}) separated by ';', up to 3 numbers each, e.g. '0.1, 0, 0.2; 0, 0, 0'`;
  // Python's json.loads first: a [K] vector (the gain column) or [K, P] rows (a bare number is no theta)
  const json = jsonValue(text);
  const rows = json === undefined ? typedThetaRows(text, k) : Array.isArray(json) && json.every(isNumber) ? json.map((v) => [v]) : json;
  if (!Array.isArray(rows) || !rows.every((row) => Array.isArray(row) && row.every(isNumber))) return { error: `theta must be numbers: ${accepted}` };
  if (rows.length !== k) return { error: `theta has ${rows.length} rows but there are ${k} segments: ${accepted}` };
  if (new Set(rows.map((row) => row.length)).size !== 1 || rows[0].length < 1 || rows[0].length > 3) {
    return { error: `theta rows must all have the same number (1 to 3) of numbers: ${accepted}` };
  }
  return { rows: rows.map(padRow) };
}

/** The `theta` text for K rows: "" when every value is 0 (theta = 0, the original). */
export function formatTheta(rows) {
  if (rows.every((row) => row.every((v) => v === 0))) return "";
  return rows.map((row) => row.map((v) => String(v === 0 ? 0 : v)).join(", ")).join("; ");
}

/** theta rows for another K: rows kept by index, new ones zero. */
export function resizeTheta(rows, k) {
  return Array.from({ length: k }, (_, i) => padRow(rows[i] ?? []));
}

/** Window start and end times in [0, 1], as perflow_core Segments.uniform / from_boundaries compute them. */
export function windowTimes(values, k) {
  if (values === null) {
    const starts = Array.from({ length: k }, (_, i) => (1.0 * (k - i)) / k);
    return { starts, ends: [...starts.slice(1), 0.0] };
  }
  const t = [1.0, ...values.slice(1, -1).map((b) => b / T), 0.0];
  return { starts: t.slice(0, -1), ends: t.slice(1) };
}

/** Steps per window: n // K each, the first n % K windows one more. */
export function stepsPerSegment(n, k) {
  return Array.from({ length: k }, (_, i) => Math.floor(n / k) + (i < n % k ? 1 : 0));
}

/** The timesteps the network sees for n steps: numpy linspace(t_s, t_e, m, endpoint=False) per window, times T,
 * truncated to integers (perflow_core Segments._grid). */
export function timestepGrid(times, n) {
  const grid = [];
  stepsPerSegment(n, times.starts.length).forEach((m, k) => {
    const start = times.starts[k];
    const step = (times.ends[k] - start) / m;
    for (let i = 0; i < m; i++) grid.push(Math.trunc((i * step + start) * T));
  });
  return grid;
}

/** Whether two steps of the grid share a training timestep (the scheduler refuses that count). */
export function hasRepeats(grid) {
  return grid.some((v, i) => i > 0 && v >= grid[i - 1]);
}
