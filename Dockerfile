# knhk and the demo upstream in one small image. Used by docker-compose.yaml.
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -o /out/ ./cmd/knhk ./cmd/knhk-demo-upstream

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/knhk /out/knhk-demo-upstream /usr/local/bin/
USER nonroot
ENTRYPOINT ["/usr/local/bin/knhk"]
CMD ["serve"]
