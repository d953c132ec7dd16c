// Felzenszwalb-Huttenlocher graph segmentation as the ICD release computes it
// (docs/release.md section 11, steps 1-5), written from that description.
//
// Every step is float32 like the original code; build with -ffp-contract=off so that no
// multiply-add is fused (a fused rounding changes the smoothed values and so the edge order).
//
// Python: segment(image, out, sigma, c, min_size) -> number of regions
//   image: (H, W, 3) uint8 C-contiguous buffer, channels in the order OpenCV decodes them (BGR);
//   out:   (H, W) int32 C-contiguous writable buffer, receives ids 1..n numbered in raster order
//          of first occurrence (release: id 0 is never used).
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// release: struct {float w; int a, b;} ordered by w alone, sorted with std::sort
struct Edge {
  float w;
  int a, b;
};

bool operator<(const Edge &x, const Edge &y) { return x.w < y.w; }

// Union-find with union by rank and path compression; a component's size is kept at its root.
class Forest {
 public:
  explicit Forest(int n) : parent_(n), rank_(n, 0), size_(n, 1) {
    for (int i = 0; i < n; ++i) parent_[i] = i;
  }

  int find(int x) {
    int root = x;
    while (parent_[root] != root) root = parent_[root];
    while (parent_[x] != root) {
      const int next = parent_[x];
      parent_[x] = root;
      x = next;
    }
    return root;
  }

  // joins two roots; returns the root of the joined component
  int join(int x, int y) {
    if (rank_[x] > rank_[y]) std::swap(x, y);
    parent_[x] = y;
    size_[y] += size_[x];
    if (rank_[x] == rank_[y]) ++rank_[y];
    return y;
  }

  int size(int root) const { return size_[root]; }

 private:
  std::vector<int> parent_, rank_, size_;
};

// Step 1 taps: m[i] = exp(-0.5 (i / sigma)^2), i = 0 .. ceil(4 sigma), divided by
// 2 sum_{i>=1} m[i] + m[0]. i / sigma and its square are float, the exponential double, the
// taps and their sum float (as in the original code).
std::vector<float> gaussian_taps(float sigma) {
  sigma = std::max(sigma, 0.01f);
  const int length = static_cast<int>(std::ceil(sigma * 4.0)) + 1;
  std::vector<float> taps(length);
  for (int i = 0; i < length; ++i) {
    const float t = i / sigma;
    taps[i] = static_cast<float>(std::exp(-0.5 * (t * t)));
  }
  float sum = 0;
  for (int i = 1; i < length; ++i) sum += taps[i];
  sum = 2 * sum + taps[0];
  for (float &tap : taps) tap /= sum;
  return taps;
}

// One pass of the separable smoothing along the rows of a (height, width) image, written
// transposed as (width, height); two passes smooth along x then y and restore the layout.
// out(x) = m[0] v(x) + sum_{i>=1} m[i] (v(max(x-i, 0)) + v(min(x+i, W-1))): border repeated.
void smooth_rows_transposed(const std::vector<float> &in, int width, int height,
                            const std::vector<float> &taps, std::vector<float> *out) {
  const int length = static_cast<int>(taps.size());
  for (int y = 0; y < height; ++y) {
    const float *row = &in[static_cast<size_t>(y) * width];
    for (int x = 0; x < width; ++x) {
      float sum = taps[0] * row[x];
      for (int i = 1; i < length; ++i) {
        sum += taps[i] * (row[std::max(x - i, 0)] + row[std::min(x + i, width - 1)]);
      }
      (*out)[static_cast<size_t>(x) * height + y] = sum;
    }
  }
}

int segment(const uint8_t *image, int height, int width, float sigma, float c, int min_size,
            int32_t *labels) {
  const int n = width * height;
  const std::vector<float> taps = gaussian_taps(sigma);
  std::vector<std::vector<float>> smoothed(3, std::vector<float>(n));
  std::vector<float> channel(n), transposed(n);
  for (int k = 0; k < 3; ++k) {
    for (int p = 0; p < n; ++p) channel[p] = image[3 * static_cast<size_t>(p) + k];
    smooth_rows_transposed(channel, width, height, taps, &transposed);   // along x
    smooth_rows_transposed(transposed, height, width, taps, &smoothed[k]);  // along y
  }

  // Step 2: per pixel in raster order, edges to right, down, down-right, up-right neighbours.
  // weight = Euclidean distance of the smoothed channels, summed in channel order, in float.
  const float *s0 = smoothed[0].data(), *s1 = smoothed[1].data(), *s2 = smoothed[2].data();
  auto weight = [s0, s1, s2](int p, int q) {
    const float d0 = s0[p] - s0[q], d1 = s1[p] - s1[q], d2 = s2[p] - s2[q];
    return std::sqrt(d0 * d0 + d1 * d1 + d2 * d2);
  };
  std::vector<Edge> edges;
  edges.reserve(4 * static_cast<size_t>(n));
  for (int y = 0; y < height; ++y) {
    for (int x = 0; x < width; ++x) {
      const int p = y * width + x;
      if (x < width - 1) edges.push_back({weight(p, p + 1), p, p + 1});
      if (y < height - 1) edges.push_back({weight(p, p + width), p, p + width});
      if (x < width - 1 && y < height - 1)
        edges.push_back({weight(p, p + width + 1), p, p + width + 1});
      if (x < width - 1 && y > 0) edges.push_back({weight(p, p - width + 1), p, p - width + 1});
    }
  }

  // Step 3: edges by weight; join when w <= threshold of both, threshold = w + c / |C| at the
  // root of the joined component (c / |C| in float, as the original's THRESHOLD macro).
  std::sort(edges.begin(), edges.end());
  Forest forest(n);
  std::vector<float> threshold(n, c);
  for (const Edge &e : edges) {
    const int a = forest.find(e.a), b = forest.find(e.b);
    if (a != b && e.w <= threshold[a] && e.w <= threshold[b]) {
      const int root = forest.join(a, b);
      threshold[root] = e.w + c / forest.size(root);
    }
  }
  // Step 4: the same sorted edges join components of which either is below min_size.
  for (const Edge &e : edges) {
    const int a = forest.find(e.a), b = forest.find(e.b);
    if (a != b && (forest.size(a) < min_size || forest.size(b) < min_size)) forest.join(a, b);
  }
  // Step 5: ids from 1 in raster order of first occurrence.
  std::vector<int32_t> id_of_root(n, 0);
  int32_t count = 0;
  for (int p = 0; p < n; ++p) {
    int32_t &id = id_of_root[forest.find(p)];
    if (id == 0) id = ++count;
    labels[p] = id;
  }
  return count;
}

bool is_int32_format(const char *format) {
  if (format == nullptr) return false;
  if (*format == '@' || *format == '=' || *format == '<') ++format;
  return (format[0] == 'i' || format[0] == 'l') && format[1] == '\0';
}

PyObject *py_segment(PyObject *, PyObject *args, PyObject *kwargs) {
  static const char *keywords[] = {"image", "out", "sigma", "c", "min_size", nullptr};
  PyObject *image_obj, *out_obj;
  float sigma, c;
  int min_size;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOffi", const_cast<char **>(keywords),
                                   &image_obj, &out_obj, &sigma, &c, &min_size)) {
    return nullptr;
  }
  Py_buffer image, out;
  if (PyObject_GetBuffer(image_obj, &image, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return nullptr;
  if (PyObject_GetBuffer(out_obj, &out, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) < 0) {
    PyBuffer_Release(&image);
    return nullptr;
  }
  int count = -1;
  if (image.ndim != 3 || image.shape[2] != 3 || image.itemsize != 1 ||
      (image.format != nullptr && std::strcmp(image.format, "B") != 0)) {
    PyErr_SetString(PyExc_ValueError, "image must be a C-contiguous (H, W, 3) uint8 array");
  } else if (image.shape[0] < 1 || image.shape[1] < 1 ||
             image.shape[0] * image.shape[1] > (1 << 28)) {
    PyErr_SetString(PyExc_ValueError, "image must have between 1 and 2**28 pixels");
  } else if (out.ndim != 2 || out.shape[0] != image.shape[0] || out.shape[1] != image.shape[1] ||
             out.itemsize != 4 || !is_int32_format(out.format)) {
    PyErr_SetString(PyExc_ValueError, "out must be a C-contiguous (H, W) int32 array");
  } else if (!(sigma > 0) || !(c > 0) || min_size < 0) {
    PyErr_SetString(PyExc_ValueError, "need sigma > 0, c > 0 and min_size >= 0");
  } else {
    const int height = static_cast<int>(image.shape[0]), width = static_cast<int>(image.shape[1]);
    Py_BEGIN_ALLOW_THREADS
    count = segment(static_cast<const uint8_t *>(image.buf), height, width, sigma, c, min_size,
                    static_cast<int32_t *>(out.buf));
    Py_END_ALLOW_THREADS
  }
  PyBuffer_Release(&image);
  PyBuffer_Release(&out);
  if (count < 0) return nullptr;
  return PyLong_FromLong(count);
}

PyMethodDef methods[] = {
    {"segment", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(py_segment)),
     METH_VARARGS | METH_KEYWORDS,
     "segment(image, out, sigma, c, min_size) -> n: Felzenszwalb ids 1..n of an (H, W, 3) uint8 "
     "image written into out, (H, W) int32 (docs/release.md section 11)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_felzenszwalb",
                      "Felzenszwalb segmentation as the ICD release computes it.", -1, methods,
                      nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__felzenszwalb(void) { return PyModule_Create(&module); }
